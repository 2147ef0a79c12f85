"""The HTTP stack we serve: KServe's always-on per-request timing trace is left out of the middleware."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kserve_timing_middleware_is_dropped_and_the_rest_kept() -> None:
    # A fresh process: KServe's protobuf modules may be imported once per process only.
    code = """
import types
from fastapi import FastAPI
from kserve.protocol.rest import server as kserve_rest
from timing_asgi import TimingMiddleware
from model_server import rest

def names(app):
    return [mw.cls.__name__ for mw in app.user_middleware]

stock = FastAPI()
kserve_rest.RESTServer._add_middlewares(types.SimpleNamespace(access_log_format=None), stock)
assert any(mw.cls is TimingMiddleware for mw in stock.user_middleware), names(stock)
rest._drop_timing_middleware()
rest._drop_timing_middleware()  # idempotent: wraps once
ours = FastAPI()
kserve_rest.RESTServer._add_middlewares(types.SimpleNamespace(access_log_format=None), ours)
assert not any(mw.cls is TimingMiddleware for mw in ours.user_middleware), names(ours)
print("OK", names(stock), names(ours))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-2000:]


def test_the_inference_fast_path_calls_the_endpoint_and_maps_errors_like_the_router() -> None:
    """InferFastPath: the exact inference route goes straight to its endpoint; its exceptions go
    through the app's handlers; anything else (query strings, other paths) goes on to the router."""
    code = """
import asyncio, httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from model_server import BadInput
from model_server.rest import InferFastPath

owner = FastAPI()
async def bad_input(request, exc):
    return JSONResponse(status_code=400, content={"error": str(exc)})
owner.add_exception_handler(BadInput, bad_input)
inner_calls = []
async def inner(scope, receive, send):
    inner_calls.append((scope["method"], scope["path"], scope["query_string"]))
    await Response("router", status_code=299)(scope, receive, send)
async def endpoint(request):
    body = await request.body()
    if body == b"bad":
        raise BadInput("named bad value")
    if body == b"boom":
        raise RuntimeError("no handler")
    return Response(b"fast:" + body)
app = InferFastPath(inner, routes={("POST", "/v2/models/m/infer"): endpoint}, owner=owner)

async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v2/models/m/infer", content=b"x")
        assert (r.status_code, r.content) == (200, b"fast:x"), r
        r = await c.post("/v2/models/m/infer", content=b"bad")
        assert r.status_code == 400 and r.json() == {"error": "named bad value"}, r.text
        assert (await c.post("/v2/models/m/infer?model_version=2", content=b"x")).status_code == 299
        assert (await c.post("/v2/models/other/infer", content=b"x")).status_code == 299
        assert (await c.get("/v2/models/m/infer")).status_code == 299
        try:
            await c.post("/v2/models/m/infer", content=b"boom")
        except RuntimeError as e:
            assert "no handler" in str(e)
        else:
            raise AssertionError("an exception without a handler must reach the server-error middleware")
    assert [c[1] for c in inner_calls] == ["/v2/models/m/infer", "/v2/models/other/infer", "/v2/models/m/infer"]
asyncio.run(main())
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
