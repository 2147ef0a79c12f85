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


def test_the_inference_door_sends_the_two_routes_to_its_chain_and_answers_500_itself() -> None:
    """InferDoor (outermost): the exact inference routes go to the chain (gate, body limit, fast path),
    everything else to the app; an exception nothing handled becomes a JSON 500 unless the response
    had started (then it goes up to the server); and serve_http's hook puts it around uvicorn's loaded app once."""
    code = """
import asyncio, httpx, types
from fastapi.responses import Response
from model_server import rest
from model_server.rest import InferDoor

app_calls, chain_calls = [], []
async def app(scope, receive, send):
    app_calls.append(scope["path"])
    await Response("app", status_code=299)(scope, receive, send)
async def chain(scope, receive, send):
    chain_calls.append(scope["path"])
    body = (await receive()).get("body", b"")
    if body == b"boom":
        raise RuntimeError("no handler")
    if body == b"late":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("after the start")
    await Response(b"chain:" + body)(scope, receive, send)
door = InferDoor(app, frozenset({("POST", "/v2/models/m/infer")}), chain)

async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=door), base_url="http://t") as c:
        r = await c.post("/v2/models/m/infer", content=b"x")
        assert (r.status_code, r.content) == (200, b"chain:x"), r
        assert (await c.post("/v2/models/m/infer?x=1", content=b"x")).status_code == 299
        assert (await c.get("/v2/models/m/infer")).status_code == 299
        assert (await c.get("/metrics")).status_code == 299
        r = await c.post("/v2/models/m/infer", content=b"boom")
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}, r.text
        try:  # the start went out: too late for a 500, the server closes the connection
            await c.post("/v2/models/m/infer", content=b"late")
        except RuntimeError as e:
            assert "after the start" in str(e)
        else:
            raise AssertionError("an error after the response started must reach the server")
    assert chain_calls == ["/v2/models/m/infer"] * 3, chain_calls
    assert app_calls == ["/v2/models/m/infer", "/v2/models/m/infer", "/metrics"], app_calls

    # The hook around KServe's server: the loaded app is wrapped once, whatever serve() is called.
    from kserve.protocol.rest import server as kserve_rest
    served = []
    async def fake_serve(self, sockets=None):
        served.append(self.config.loaded_app)
    kserve_rest._RefreshingServer.serve = fake_serve
    fastapi_app = types.SimpleNamespace(state=types.SimpleNamespace(infer_door=(frozenset(), chain)))
    rest._open_infer_door(fastapi_app)
    config = types.SimpleNamespace(loaded=False, loaded_app=None)
    def load():
        config.loaded, config.loaded_app = True, app
    config.load = load
    server = types.SimpleNamespace(config=config)
    await kserve_rest._RefreshingServer.serve(server)
    await kserve_rest._RefreshingServer.serve(server)
    assert isinstance(served[0], InferDoor) and served[0].app is app and served[1] is served[0]
asyncio.run(main())
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
