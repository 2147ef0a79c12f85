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
