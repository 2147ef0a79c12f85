"""HTTP additions to KServe's FastAPI app: v1 and v2 infer routes that parse bodies strictly
(content type, JSON, the binary-tensor extension without a round trip through Python lists),
request size limits, an admission gate (overload and draining), the admin-token gate, an
OpenAPI description of what is really served, and HTTP status codes for the predictor's errors."""

from __future__ import annotations

import dataclasses
import functools
import hmac
import inspect
import json
import logging
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from kserve.errors import ModelNotFound, ModelNotReady
from kserve.model import Model
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_server import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge, ServerError
from model_server import metrics as m
from model_server.config import install_event_loop
from model_server.lifecycle import RepositoryDisabled, ServingState
from model_server.predictor import DenseNetPredictor

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
RETRY_AFTER_S = "1"
#: Paths answered even while draining: liveness (a draining pod is alive) and metrics.
ALWAYS_OPEN = frozenset({"/", "/v2/health/live", "/metrics"})
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/admin/"


class UnsupportedMediaType(BadInput):
    """A body sent with a content type the route does not parse; HTTP 415."""


class ModelVersionNotFound(ServerError):
    """A model version was asked for; this predictor serves one unversioned model. HTTP 404."""


class AdminDenied(Exception):
    """An admin request refused: 404 while admin endpoints are off, 401 without the right token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


class InferFastPath:
    """The model's two inference routes answered without FastAPI's router, by the same endpoints.

    Innermost of our middlewares (after the admission gate and the body limit), it calls the v1
    and v2 endpoint functions directly for ``POST /v1/models/<name>:predict`` and
    ``POST /v2/models/<name>/infer`` without a query string, and maps their exceptions through the
    app's own exception handlers, as Starlette's ``ExceptionMiddleware`` would; an exception
    with no handler goes up to the server-error middleware as before. Everything else (other
    models, versions, query parameters, other methods) goes through the router. What it skips
    per request is routing, dependency solving and three ASGI layers: about a quarter of a front
    end's CPU per request (``benchmarks/frontend_bench.py``).
    """

    def __init__(
        self, app: ASGIApp, routes: Mapping[tuple[str, str], Callable[[Request], Any]], owner: FastAPI
    ) -> None:
        self.app = app
        self.routes = routes
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = (
            self.routes.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" else None
        )
        if endpoint is None or scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        handlers = self.owner.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:  # the server-error middleware's, as with the router
                return None
            if cls in handlers:
                return handlers[cls]
        return None


def is_inference(method: str, path: str) -> bool:
    return method == "POST" and (
        (path.startswith("/v1/models/") and path.endswith(":predict"))
        or (path.startswith("/v2/models/") and path.endswith("/infer"))
    )


class GateMiddleware:
    """Admission in front of every route, answered before a body is read.

    - Draining (after SIGTERM): everything but liveness and metrics gets 503, readiness included,
      so the router stops sending work while accepted requests finish.
    - Overload: an inference request gets 503 + ``Retry-After`` at once when the batch queue is
      full or ``state.max_inflight`` requests are already being handled (their bodies are in
      memory), instead of being decoded only to be refused by the batcher.
    - ``/openapi.json`` and ``/docs`` answer 404 unless ``enable_docs``.
    - Every admitted request is counted in ``state.inflight``, which the drain waits for.
    """

    def __init__(self, app: ASGIApp, state: ServingState, model: DenseNetPredictor, enable_docs: bool) -> None:
        self.app = app
        self.state = state
        self.model = model
        self.enable_docs = enable_docs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in DOCS_PATHS and not self.enable_docs:
            await _send_error(send, 404, "Not Found", key="detail")
            return
        if self.state.draining:
            m.REJECTED.labels(reason="draining").inc()
            await _send_error(
                send, 503, "server is shutting down; retry on another replica", {"Retry-After": RETRY_AFTER_S}
            )
            return
        if is_inference(scope["method"], path):
            refusal = self._refusal()
            if refusal is not None:
                await _send_error(send, 503, refusal, {"Retry-After": RETRY_AFTER_S})
                return
        else:
            self.state.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.leave()

    def _refusal(self) -> str | None:
        batcher = self.model.batcher
        if batcher is not None and batcher.queued_images >= batcher.max_queue_images:
            m.REJECTED.labels(reason="queue_full").inc()
            return f"batch queue is full ({batcher.queued_images} images waiting); retry shortly"
        if not self.state.try_enter():
            m.REJECTED.labels(reason="inflight_limit").inc()
            return f"{self.state.inflight} requests in flight, the limit of this replica; retry shortly"
        return None


async def _send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None, *, key: str = "error"
) -> None:
    body = json.dumps({key: message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
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


async def _unsupported_media(_: Request, exc: Exception) -> Response:
    return _error_response(415, exc)


async def _admin_denied(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdminDenied)
    if exc.status == 404:  # off: indistinguishable from a path that does not exist
        return JSONResponse(status_code=404, content={"detail": "Not Found"})
    return JSONResponse(status_code=exc.status, content={"error": str(exc)}, headers={"WWW-Authenticate": "Bearer"})


async def _version_not_found(_: Request, exc: Exception) -> Response:
    return _error_response(404, exc)


async def _repository_disabled(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RepositoryDisabled)
    return JSONResponse(status_code=403, content={"error": exc.details})


async def _server_error(_: Request, exc: Exception) -> Response:
    return _error_response(500, exc)


def _check_bytes_framing(raw: bytes, shape: list[int], where: str) -> None:
    """A binary BYTES tensor is a run of (4-byte little-endian length, bytes) elements, one per
    element of ``shape``; refuse one whose lengths run past its size or whose count is wrong."""
    expected = 1
    for d in shape:
        expected *= d
    count = pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInput(f"{where}: BYTES element {count} has a truncated 4-byte length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise BadInput(
                f"{where}: BYTES element {count} claims {n} bytes but only {len(raw) - pos - 4} remain in the tensor"
            )
        pos += 4 + n
        count += 1
        if count > expected:
            break
    if count != expected:
        raise BadInput(f"{where}: BYTES tensor holds {count} element(s) but its shape {shape} says {expected}")


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
            if inp.datatype == "BYTES":
                _check_bytes_framing(inp._raw_data, shape, f"inputs[{k}]")
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


def check_content_type(request: Request, *, binary: bool) -> None:
    """Accept JSON (and, on v2, the binary-tensor extension's octet stream); refuse anything else with 415.

    A missing content type and ``application/x-www-form-urlencoded`` (what ``curl -d`` sends)
    are read as JSON, so the README's curl examples work.
    """
    raw = request.headers.get("content-type")
    if raw is None:
        return
    mime = raw.split(";", 1)[0].strip().lower()
    if mime in ("", "application/json", "application/x-www-form-urlencoded") or mime.endswith("+json"):
        return
    if binary and mime == "application/octet-stream":
        return
    accepted = "application/json" + (", or application/octet-stream with the binary-tensor extension" if binary else "")
    raise UnsupportedMediaType(f"content-type {mime!r} is not accepted here; send {accepted}")


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object body, naming the problem when it is not one."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadInput(f"request body is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadInput(f"{what} body must be a JSON object, got {type(doc).__name__}")
    return doc


# -- admin endpoints -------------------------------------------------------------------------------


def require_admin_token(request: Request) -> None:
    """FastAPI dependency of every admin endpoint.

    Raises:
        AdminDenied: 404 while no admin token is configured (the endpoints are off and look
            like paths that do not exist), 401 without ``Authorization: Bearer <token>`` or with
            a wrong token (compared in constant time).
    """
    expected: str | None = getattr(request.app.state, "densenet_admin_token", None)
    if not expected:
        raise AdminDenied(404, "Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise AdminDenied(401, "admin endpoint: send Authorization: Bearer <token> with the configured admin token")


def add_admin_route(app: FastAPI, path: str, endpoint: Callable[..., Any], *, methods: list[str]) -> None:
    """Register an admin endpoint (under ``/admin/``) behind :func:`require_admin_token`, left out of OpenAPI.

    The profiler capture goes here too: ``add_admin_route(app, "/admin/v1/profile", profile, methods=["POST"])``.
    """
    if not path.startswith(ADMIN_PREFIX):
        raise ValueError(f"admin routes live under {ADMIN_PREFIX}, got {path}")
    app.add_api_route(
        path, endpoint, methods=methods, dependencies=[Depends(require_admin_token)], include_in_schema=False
    )


# -- OpenAPI ---------------------------------------------------------------------------------------

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "minLength": 1}},
}
_V1_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instances"],
    "properties": {
        "instances": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string"}}}
                },
            },
        },
        "parameters": {
            "type": "object",
            "properties": {
                "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
                "return_logits": {"type": "boolean"},
            },
        },
    },
}
_V1_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["predictions"],
    "properties": {
        "predictions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["classes", "labels", "probabilities"],
                "properties": {
                    "classes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "labels": {"type": "array", "items": {"type": "string"}},
                    "probabilities": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                    "logits": {"type": "array", "items": {"type": "number"}, "minItems": 1000, "maxItems": 1000},
                },
            },
        }
    },
}
_V2_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape", "data"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32", "FP16", "UINT8"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_V2_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"top_k": {"type": "integer", "minimum": 1, "maximum": 1000}}},
        "inputs": {"type": "array", "items": _V2_TENSOR_SCHEMA},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": ["probabilities", "classes", "labels", "logits"]},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
}
_V2_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string", "enum": ["FP32", "INT64", "BYTES"]},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "data": {"type": "array"},
                },
            },
        },
    },
}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _infer_docs(request_schema: dict[str, Any], response_schema: dict[str, Any]) -> dict[str, Any]:
    error = _json_content(_ERROR_SCHEMA)
    return {
        "openapi_extra": {"requestBody": {"required": True, **_json_content(request_schema)}},
        "responses": {
            200: {"description": "top-k classes (and logits on request)", **_json_content(response_schema)},
            400: {"description": "bad input, named in `error`", **error},
            404: {"description": "unknown model"},
            413: {"description": "body, image or batch over the limits", **error},
            415: {"description": "content type not accepted", **error},
            503: {"description": "overloaded or shutting down; see Retry-After", **error},
            504: {"description": "deadline passed while queued", **error},
        },
    }


def _served_openapi(app: FastAPI, own: list[APIRoute]) -> Callable[[], dict[str, Any]]:
    """OpenAPI of what really answers. Where our route and KServe's share a path and method, ours
    (registered first) serves, so its operation replaces KServe's in the document; repository
    load/unload (refused) and versioned infer (404) are left out, as are admin routes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            title = "DenseNet-121 predictor (KServe v1 / Open Inference Protocol v2)"
            doc = get_openapi(title=title, version=app.version, routes=app.routes)
            ours = get_openapi(title=title, version=app.version, routes=own)
            for path, operations in ours["paths"].items():
                doc["paths"].setdefault(path, {}).update(operations)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(
                ours.get("components", {}).get("schemas", {})
            )
            for path in list(doc["paths"]):
                if path.startswith("/v2/repository/") or "/versions/{model_version}" in path:
                    del doc["paths"][path]
            app.openapi_schema = doc
        schema: dict[str, Any] = app.openapi_schema
        return schema

    return openapi


# -- installation ----------------------------------------------------------------------------------


def install(
    app: FastAPI,
    model: DenseNetPredictor,
    *,
    max_body_bytes: int,
    state: ServingState | None = None,
    admin_token: str | None = None,
    enable_docs: bool = False,
) -> ServingState:
    """Add our routes, limits, gates and error mapping to KServe's app; call before ``ModelServer.start``.

    Routes added here are matched before KServe's own, which it registers at start.

    Args:
        app: KServe's FastAPI app (``kserve.model_server.app``).
        model: the served model.
        max_body_bytes: request body limit (413).
        state: admission and draining state shared with :class:`~model_server.lifecycle.DrainingModelServer`;
            by default one admitting ``max_queue_images + 2 * max_batch_size`` requests at once.
        admin_token: bearer token of ``/admin/...``; ``None`` or empty turns admin endpoints off (404).
        enable_docs: serve ``/openapi.json``.

    Returns:
        The admission state in use.
    """
    if state is None:
        state = ServingState(max_inflight=model.config.max_queue_images + 2 * model.config.max_batch_size)
    if hasattr(model, "serving_state"):
        model.serving_state = state  # gRPC calls count in it and are refused while it drains (predictor)
    app.state.densenet_admin_token = admin_token or None
    direct = kserve_hooks_are_identity(model)

    async def run_model(payload: dict[str, Any] | InferRequest, request: Request) -> Any:
        if direct:
            # KServe's Model.__call__ would add three histogram writes (its request_preprocess/predict/
            # postprocess_seconds), six clock reads and three coroutine checks around our predict;
            # densenet_request_seconds times the same span.
            return await model.predict(payload)
        response, _ = await model(payload, dict(request.headers))
        return response

    async def v1_predict(request: Request, model_name: str) -> Response:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        if not model.ready:
            raise ModelNotReady(model_name)
        check_content_type(request, binary=False)
        doc = parse_json_object(await request.body(), "v1")
        response = await run_model(doc, request)
        return Response(
            content=orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    async def v1_explain(model_name: str) -> Response:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        return JSONResponse(status_code=404, content={"error": f"model {model_name} has no explainer"})

    async def v2_infer(request: Request, model_name: str) -> Response:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        if not model.ready:
            raise ModelNotReady(model_name)
        check_content_type(request, binary=True)
        body = await request.body()
        infer_request = parse_v2_body(body, request.headers.get(HEADER_LENGTH), model_name)
        response = await run_model(infer_request, request)
        content, json_length = response.to_rest()
        if json_length is None:
            return Response(
                content=orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
            )
        return Response(
            content=content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    async def v2_versioned_infer(model_name: str, model_version: str) -> Response:
        if model_name != model.name:
            raise ModelNotFound(model_name)
        return JSONResponse(
            status_code=404,
            content={
                "error": f"model {model_name} has no version {model_version!r}; use /v2/models/{model_name}/infer"
            },
        )

    def _unversioned(model_name: str, model_version: str | None) -> None:
        # KServe answers a version (path or ?model_version=) with 501; this model has none: 404.
        if model_name != model.name:
            raise ModelNotFound(model_name)
        if model_version is not None:
            raise ModelVersionNotFound(
                f"model {model_name} has no version {model_version!r}; it serves one, unversioned"
            )

    async def v2_metadata(model_name: str, model_version: str | None = None) -> dict[str, Any]:
        _unversioned(model_name, model_version)
        return model.metadata()

    async def v2_ready(model_name: str, model_version: str | None = None) -> dict[str, Any]:
        _unversioned(model_name, model_version)
        if not model.ready:
            raise ModelNotReady(model_name)
        return {"name": model_name, "ready": True}

    async def admin_info() -> dict[str, Any]:
        batcher = model.batcher
        return {
            "model_name": model.name,
            "variant": model.manifest.get("slug"),
            "runtime": model.manifest.get("runtime"),
            "precision": model.manifest.get("precision"),
            "device": str(model.runner.device) if model.runner is not None else None,
            "ready": model.ready,
            "load_seconds": model.load_seconds,
            "config": dataclasses.asdict(model.config),
            "queue_images": batcher.queued_images if batcher is not None else 0,
            "max_queue_images": batcher.max_queue_images if batcher is not None else None,
            "inflight_requests": state.inflight,
            "max_inflight_requests": state.max_inflight,
            "draining": state.draining,
        }

    async def admin_profile_start(request: Request) -> JSONResponse:
        """Capture a torch.profiler trace of the next ``batches`` batches or ``seconds`` of serving."""
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError as e:
            raise BadInput(f"profile request body is not JSON: {e}") from e
        if not isinstance(body, dict) or set(body) - {"batches", "seconds"}:
            raise BadInput('profile request body: {"batches": N} or {"seconds": T}')
        try:
            cap = await model.profile_control({"op": "start", **body})
        except ValueError as e:
            raise BadInput(str(e)) from e
        url = f"/admin/v1/profile/{cap['id']}"
        return JSONResponse(status_code=202, content={**cap, "status_url": url, "trace_url": f"{url}/trace"})

    async def admin_profile_status(capture_id: str) -> dict[str, Any]:
        try:
            return await model.profile_control({"op": "get", "id": capture_id})
        except KeyError as e:
            raise HTTPException(status_code=404, detail=f"no profiler capture {capture_id!r}") from e

    async def admin_profile_trace(capture_id: str) -> Response:
        cap = await admin_profile_status(capture_id)
        if cap["state"] != "done" or not cap.get("trace"):
            return JSONResponse(status_code=409, content={"error": f"capture {capture_id} is {cap['state']}", **cap})
        return FileResponse(cap["trace"], media_type="application/json", filename=Path(cap["trace"]).name)

    add_admin_route(app, "/admin/v1/profile", admin_profile_start, methods=["POST"])
    add_admin_route(app, "/admin/v1/profile/{capture_id}", admin_profile_status, methods=["GET"])
    add_admin_route(app, "/admin/v1/profile/{capture_id}/trace", admin_profile_trace, methods=["GET"])

    app.add_api_route(
        "/v1/models/{model_name}:predict",
        v1_predict,
        methods=["POST"],
        **_infer_docs(_V1_REQUEST_SCHEMA, _V1_RESPONSE_SCHEMA),
    )
    app.add_api_route("/v1/models/{model_name}:explain", v1_explain, methods=["POST"], include_in_schema=False)
    app.add_api_route(
        "/v2/models/{model_name}/infer",
        v2_infer,
        methods=["POST"],
        **_infer_docs(_V2_REQUEST_SCHEMA, _V2_RESPONSE_SCHEMA),
    )
    app.add_api_route(
        "/v2/models/{model_name}/versions/{model_version}/infer", v2_versioned_infer, methods=["POST"],
        include_in_schema=False,
    )  # fmt: skip
    for path, endpoint in (
        ("/v2/models/{model_name}", v2_metadata),
        ("/v2/models/{model_name}/versions/{model_version}", v2_metadata),
        ("/v2/models/{model_name}/ready", v2_ready),
        ("/v2/models/{model_name}/versions/{model_version}/ready", v2_ready),
    ):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema="versions" not in path)
    add_admin_route(app, "/admin/v1/info", admin_info, methods=["GET"])
    own = [r for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema]
    app.openapi = _served_openapi(app, own)  # type: ignore[method-assign]
    # Starlette runs the middleware added last first: the gate answers before the body limit reads,
    # and the fast path for inference comes last, inside both.
    fast = {
        ("POST", f"/v1/models/{model.name}:predict"): functools.partial(_call_with_name, v1_predict, model.name),
        ("POST", f"/v2/models/{model.name}/infer"): functools.partial(_call_with_name, v2_infer, model.name),
    }
    app.add_middleware(InferFastPath, routes=fast, owner=app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(GateMiddleware, state=state, model=model, enable_docs=enable_docs)
    handlers: dict[type[Exception], Any] = {
        UnsupportedMediaType: _unsupported_media,
        PayloadTooLarge: _too_large,
        BadInput: _bad_input,
        Overloaded: _overloaded,
        DeadlineExceeded: _deadline,
        ServerError: _server_error,
        AdminDenied: _admin_denied,
        ModelVersionNotFound: _version_not_found,
        RepositoryDisabled: _repository_disabled,
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
    app.router.on_startup.append(functools.partial(warm_http_path, app, model.name))
    return state


def kserve_hooks_are_identity(model: Model) -> bool:
    """Whether ``model`` keeps KServe's own ``preprocess`` and ``postprocess`` (both return their input):
    then the REST routes call its ``predict`` directly instead of going through ``Model.__call__``."""
    return type(model).preprocess is Model.preprocess and type(model).postprocess is Model.postprocess


async def _call_with_name(endpoint: Callable[[Request, str], Any], model_name: str, request: Request) -> Response:
    response: Response = await endpoint(request, model_name)
    return response


async def warm_http_path(app: FastAPI, model_name: str) -> None:
    """Send one v1, one v2 JSON and one v2 binary request through the whole ASGI app in-process
    (middlewares, routes, parsing, batcher, device, response encoding), then the health and
    metadata GETs, before the server accepts connections, so the first client request (or
    probe) pays no first-call costs of its own."""
    import base64
    import io

    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 120, 60)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    b64 = base64.b64encode(jpeg).decode()
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(jpeg) + 4}}
            ]
        }
    ).encode()
    requests: list[tuple[str, dict[str, Any]]] = [
        (f"/v1/models/{model_name}:predict", {"json": {"instances": [{"image": {"b64": b64}}]}}),
        (
            f"/v2/models/{model_name}/infer",
            {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}},
        ),
        (
            f"/v2/models/{model_name}/infer",
            {
                "content": header + struct.pack("<I", len(jpeg)) + jpeg,
                "headers": {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"},
            },
        ),
    ]
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://warm-up") as client:
            for path, kwargs in requests:
                r = await client.post(path, **kwargs)
                if r.status_code != 200:
                    log.warning("warm-up request %s answered %d: %s", path, r.status_code, r.text[:200])
            # Probes and metadata too: their first call builds response classes and schemas (FastAPI
            # warns once about ORJSONResponse there), which would land on the first readiness probe.
            for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{model_name}/ready",
                         f"/v2/models/{model_name}", f"/v1/models/{model_name}"):  # fmt: skip
                r = await client.get(path)
                log.debug("warm-up GET %s answered %d", path, r.status_code)  # not ready yet is fine here
    except Exception as e:  # a failed warm-up must not stop the server; the first request pays instead
        log.warning("HTTP warm-up failed: %s", e)
    from model_server.lifecycle import settle_after_startup

    settle_after_startup()


def _drop_timing_middleware() -> None:
    """Leave out KServe's per-request timing trace (``timing_asgi``) when it would not be logged.

    KServe 0.21 always installs it: per request it reads the process CPU time twice, names the
    route and formats an INFO line that ``kserve.trace`` then drops; about 4 % of a front end's
    CPU per request (``benchmarks/frontend_bench.py``). Our histograms time the same span.
    """
    from kserve.protocol.rest import server as kserve_rest
    from timing_asgi import TimingMiddleware

    original = kserve_rest.RESTServer._add_middlewares
    if getattr(original, "densenet_no_timing", False):
        return

    def add_middlewares(self: Any, app: FastAPI) -> None:
        original(self, app)
        app.user_middleware[:] = [mw for mw in app.user_middleware if mw.cls is not TimingMiddleware]

    add_middlewares.densenet_no_timing = True  # type: ignore[attr-defined]
    kserve_rest.RESTServer._add_middlewares = add_middlewares


def serve_http(model: DenseNetPredictor, spec: dict[str, Any]) -> bool:
    """Install our routes on KServe's app and run its HTTP and gRPC servers until drained.

    ``spec`` holds the front-end settings the CLI parsed (ports, limits, admin token, docs,
    grace period, in-flight limit). Shared by the single-process server and every front end
    of ``--frontends N``. Returns whether the drain finished within the grace period.
    """
    import kserve.model_server as kserve_server

    from model_server.lifecycle import DrainingModelServer

    state = ServingState(max_inflight=spec["max_inflight"])
    install(
        kserve_server.app, model, max_body_bytes=spec["max_body_bytes"], state=state,
        admin_token=spec["admin_token"], enable_docs=spec["enable_docs"],
    )  # fmt: skip
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # KServe logs every request at INFO (access log and timing trace): too slow for the hot path.
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _drop_timing_middleware()
    server = DrainingModelServer(
        model=model,
        state=state,
        grace_period_s=spec["grace_period_s"],
        http_port=spec["http_port"],
        grpc_port=spec["grpc_port"],
        enable_docs_url=False,
        enable_latency_logging=False,
    )
    loop = install_event_loop(spec.get("event_loop", "auto"))
    log.debug("serving HTTP and gRPC on the %s event loop", loop)
    server.start([model])
    clean: bool = server.clean_exit
    return clean
