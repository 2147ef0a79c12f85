"""HTTP additions to KServe's FastAPI app: a v2 infer route that handles the binary-tensor
extension for BYTES and tensors without a round trip through Python lists, request size
limits, and HTTP status codes for the predictor's own errors."""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from kserve.errors import ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_server import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge, ServerError
from model_server import metrics as m
from model_server.predictor import DenseNetPredictor

HEADER_LENGTH = "inference-header-content-length"
RETRY_AFTER_S = "1"


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` before they are read into memory (HTTP 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _send_error(send, 400, f"Content-Length {value.decode(errors='replace')!r} is not a number")
                    return
                if length > self.max_bytes:
                    m.REJECTED.labels(reason="too_large").inc()
                    await _send_error(send, 413, f"request body is {length} bytes; the limit is {self.max_bytes}")
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_response(status: int, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": str(exc)}, headers=headers)


async def _bad_input(_: Request, exc: Exception) -> Response:
    return _error_response(400, exc)


async def _too_large(_: Request, exc: Exception) -> Response:
    return _error_response(413, exc)


async def _overloaded(_: Request, exc: Exception) -> Response:
    return _error_response(503, exc, {"Retry-After": RETRY_AFTER_S})


async def _deadline(_: Request, exc: Exception) -> Response:
    return _error_response(504, exc)


async def _server_error(_: Request, exc: Exception) -> Response:
    return _error_response(500, exc)


def parse_v2_body(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """Parse a v2 REST body, JSON or JSON header plus binary tensors, into KServe's ``InferRequest``.

    Raises:
        BadInput: malformed JSON, missing fields, or binary sizes that disagree with the body.
    """
    json_len = len(body)
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError as e:
            raise BadInput(f"{HEADER_LENGTH} {header_length!r} is not a number") from e
        if not 0 < json_len <= len(body):
            raise BadInput(f"{HEADER_LENGTH} is {json_len} but the body has {len(body)} bytes")
    try:
        doc = orjson.loads(body[:json_len])
    except orjson.JSONDecodeError as e:
        raise BadInput(f"request body is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadInput('v2 body needs "inputs": a list of tensors')
    inputs: list[InferInput] = []
    offset = json_len
    for k, spec in enumerate(doc["inputs"]):
        if not isinstance(spec, dict):
            raise BadInput(f"inputs[{k}] must be an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise BadInput(f'inputs[{k}] needs "name" and "datatype" strings')
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise BadInput(f'inputs[{k}] "shape" must be a list of integers, got {shape!r}')
        if any(d < 0 for d in shape):
            raise BadInput(f'inputs[{k}] "shape" has a negative dimension: {shape}')
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadInput(f'inputs[{k}] "parameters" must be an object')
        inp = InferInput(name=name, shape=shape, datatype=datatype.upper(), parameters=params or None)
        if "data" in spec:
            inp._data = spec["data"]
        elif "binary_data_size" in params:
            size = params["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadInput(f"inputs[{k}] binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(body):
                raise BadInput(
                    f"binary-tensor header says inputs[{k}] has {size} bytes at offset {offset}, "
                    f"but the body ends at {len(body)}"
                )
            inp._raw_data = body[offset : offset + size]
            offset += size
        else:
            raise BadInput(f'inputs[{k}] has neither "data" nor parameters.binary_data_size')
        inputs.append(inp)
    if offset != len(body):
        raise BadInput(
            f"binary-tensor sizes add up to {offset - json_len} bytes but {len(body) - json_len} follow the JSON header"
        )
    outputs = doc.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise BadInput('"outputs" must be a list of {"name": ...}')
        requested = [RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in outputs]
    parameters = doc.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadInput('"parameters" must be an object')
    request_id = doc.get("id")
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=request_id if isinstance(request_id, str) else None,
        parameters=parameters,
        request_outputs=requested,
    )


def install(app: FastAPI, model: DenseNetPredictor, *, max_body_bytes: int) -> None:
    """Add our routes, limits and error mapping to KServe's app; call before ``ModelServer.start``.

    Routes added here are matched before KServe's own, which it registers at start.
    """

    async def v2_infer(request: Request, model_name: str) -> Response:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        if not model.ready:
            raise ModelNotReady(model_name)
        body = await request.body()
        infer_request = parse_v2_body(body, request.headers.get(HEADER_LENGTH), model_name)
        response, _ = await model(infer_request, dict(request.headers))
        content, json_length = response.to_rest()
        if json_length is None:
            return Response(
                content=orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
            )
        return Response(
            content=content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    app.add_api_route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    handlers: dict[type[Exception], Any] = {
        PayloadTooLarge: _too_large,
        BadInput: _bad_input,
        Overloaded: _overloaded,
        DeadlineExceeded: _deadline,
        ServerError: _server_error,
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
