"""The KServe model: v1 and v2 requests in, decoded and batched on the device, top-k out."""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kserve
import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from model_server import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge, ServerError
from model_server import metrics as m
from model_server.config import ServingConfig
from model_server.images import CpuDecodeShare, JpegBatch, Payload, decode_and_crop, gpu_frame, payload_size
from optimize.registry import CROP_SIZE, NUM_CLASSES

if TYPE_CHECKING:
    # The device side, which a front end of --frontends N (a RemotePredictor) never imports: none
    # of this module's request path needs torch, so a front end does not load it at all.
    from model_server.batcher import DynamicBatcher
    from model_server.device import LoadedModel
    from model_server.profiler import ProfileCapture
    from model_server.runtimes import Runner

log = logging.getLogger(__name__)

OUTPUTS = ("probabilities", "classes", "labels", "logits")
DEFAULT_OUTPUTS = ("probabilities", "classes", "labels")
TENSOR_DTYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


class DenseNetPredictor(kserve.Model):  # type: ignore[misc]
    """Serves one artifact. ``load`` reads and verifies it, warms every batch bucket, then sets ``ready``."""

    def __init__(self, name: str, artifact_dir: Path, config: ServingConfig) -> None:
        super().__init__(name)
        self.artifact_dir = artifact_dir
        self.config = config
        self.manifest: dict[str, Any] = {}
        self.labels: np.ndarray = np.array([], dtype=object)
        self.runner: Runner | None = None
        self.batcher: DynamicBatcher | None = None
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.preprocess_threads, thread_name_prefix="decode"
        )
        self.load_seconds: float | None = None
        self._gpu_decode = False
        self._cpu_share = CpuDecodeShare(config.cpu_decode_share, threads=config.preprocess_threads)
        self.profiler: ProfileCapture | None = None
        #: The process's admission state (``lifecycle.ServingState``), set where the server is put
        #: together: gRPC inference calls count among its requests in flight, so a drain waits for
        #: them, and are refused (UNAVAILABLE) once it drains. HTTP requests are counted by the gate.
        self.serving_state: Any = None

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self) -> bool:
        from model_server.device import load_model

        return self.attach(load_model(self.artifact_dir, self.config))

    def attach(self, loaded: LoadedModel) -> bool:
        """Serve an artifact :func:`~model_server.device.load_model` loaded and warmed (the CLI runs
        it in a thread while this process imports KServe), then set ``ready``."""
        self.manifest = loaded.manifest
        self.labels = loaded.labels
        self.runner = loaded.runner
        self.profiler = loaded.profiler
        self.batcher = loaded.batcher
        self._gpu_decode = loaded.gpu_decode
        self.load_seconds = loaded.load_seconds
        self.ready = True
        return True

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def profile_control(self, op: dict[str, Any]) -> dict[str, Any]:
        """Profiler captures: ``{"op": "start", "batches"|"seconds": ...}`` or ``{"op": "get", "id": ...}``."""
        from model_server.device import profile_op

        return profile_op(self.profiler, op)

    @property
    def gpu_decode(self) -> bool:
        """Whether JPEGs go to the device worker for nvJPEG (CUDA device and ``gpu_decode`` on)."""
        return self._gpu_decode

    def max_batch(self) -> int:
        """Largest device batch (the artifact's and the flag's minimum)."""
        return self.batcher.max_batch_size if self.batcher else self.config.max_batch_size

    def metadata(self) -> dict[str, Any]:
        """v2 model metadata (``GET /v2/models/<name>``)."""
        max_batch = self.max_batch()
        return {
            "name": self.name,
            "versions": [],
            "platform": f"densenet121/{self.manifest.get('runtime', '?')}",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, CROP_SIZE, CROP_SIZE]},
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "classes", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, NUM_CLASSES]},
            ],
            "parameters": {"variant": self.manifest.get("slug"), "max_batch_size": max_batch},
        }

    def get_input_types(self) -> list[dict[str, Any]]:
        inputs: list[dict[str, Any]] = self.metadata()["inputs"]
        return inputs

    def get_output_types(self) -> list[dict[str, Any]]:
        outputs: list[dict[str, Any]] = self.metadata()["outputs"]
        return outputs

    # -- request path ----------------------------------------------------------------------------

    async def predict(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        t0 = time.perf_counter()
        is_grpc = isinstance(payload, InferRequest) and payload.from_grpc
        state = self.serving_state if is_grpc else None
        if state is not None:
            if state.draining:
                m.REJECTED.labels(reason="draining").inc()
                from grpc_interceptor import exceptions as grpc_exc

                raise grpc_exc.Unavailable("shutting down: not taking new requests; retry on another replica")
            state.enter()
        try:
            protocol = "grpc" if is_grpc else ("v2" if isinstance(payload, InferRequest) else "v1")
            try:
                if isinstance(payload, InferRequest):
                    result: dict[str, Any] | InferResponse = await self._predict_v2(payload)
                elif isinstance(payload, dict):
                    result = await self._predict_v1(payload)
                else:
                    raise BadInput(f"unsupported request body of type {type(payload).__name__}")
            except ServerError as e:
                if isinstance(e, BadInput) and not isinstance(e, PayloadTooLarge):
                    m.REJECTED.labels(reason="bad_input").inc()
                elif isinstance(e, PayloadTooLarge):
                    m.REJECTED.labels(reason="too_large").inc()
                if is_grpc:
                    raise _grpc_error(e) from e
                raise
            m.later_observe(m.REQUEST_SECONDS, time.perf_counter() - t0, protocol)
            m.flush_soon(asyncio.get_running_loop())  # after this task has sent its answer, unless it must wait
            return result
        finally:
            if state is not None:
                state.leave()

    async def _predict_v1(self, payload: dict[str, Any]) -> dict[str, Any]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise BadInput('v1 body needs "instances": a list of {"image": {"b64": "..."}}')
        top_k, want_logits = self._parameters(payload.get("parameters"))
        self._check_count(len(instances))
        images = [_v1_image_bytes(i, inst) for i, inst in enumerate(instances)]
        logits = await self._infer(await self._decode(images))
        probs, classes = _topk(logits, top_k)
        predictions = []
        for row in range(logits.shape[0]):
            pred: dict[str, Any] = {
                "classes": classes[row].tolist(),
                "labels": [self.labels[c].decode() for c in classes[row]],
                "probabilities": probs[row].tolist(),
            }
            if want_logits:
                pred["logits"] = logits[row].tolist()
            predictions.append(pred)
        return {"predictions": predictions}

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        if len(request.inputs) != 1:
            raise BadInput(
                f"expected exactly 1 input (BYTES images or a [N,3,224,224] tensor), got {len(request.inputs)}"
            )
        params = _plain_parameters(request.parameters)
        top_k, _ = self._parameters(params)
        requested = [o.name for o in request.request_outputs] if request.request_outputs else list(DEFAULT_OUTPUTS)
        unknown = [n for n in requested if n not in OUTPUTS]
        if unknown:
            raise BadInput(f"unknown output(s) {', '.join(unknown)}; valid outputs: {', '.join(OUTPUTS)}")
        inp = request.inputs[0]
        if inp.datatype == "BYTES":
            items = _bytes_items(inp)
            self._check_count(len(items))
            x = await self._decode(items)
        elif inp.datatype in TENSOR_DTYPES:
            x = _tensor_input(inp, self.config.max_request_images)
            self._check_count(x.shape[0])
        else:
            raise BadInput(
                f"input datatype {inp.datatype!r} is not supported; valid: BYTES, {', '.join(TENSOR_DTYPES)}"
            )
        logits = await self._infer(x)
        probs, classes = _topk(logits, top_k)
        n = logits.shape[0]
        available = {
            "probabilities": InferOutput("probabilities", [n, top_k], "FP32", probs),
            "classes": InferOutput("classes", [n, top_k], "INT64", classes.astype(np.int64)),
            "labels": InferOutput("labels", [n, top_k], "BYTES", self.labels[classes]),
            "logits": InferOutput("logits", [n, NUM_CLASSES], "FP32", logits),
        }
        outputs = [available[name] for name in requested]
        if request.from_grpc:
            # Serialise now: KServe 0.21's to_grpc() tests ``ndarray`` data for truth and fails.
            for out in outputs:
                out.set_data_from_numpy(out.data, binary_data=True)
        return InferResponse(
            response_id=request.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            from_grpc=request.from_grpc,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    def _parameters(self, params: Any) -> tuple[int, bool]:
        if params is None:
            return self.config.default_top_k, False
        if not isinstance(params, dict):
            raise BadInput('"parameters" must be an object')
        top_k = params.get("top_k", self.config.default_top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= NUM_CLASSES:
            raise BadInput(f"parameter top_k must be an integer from 1 to {NUM_CLASSES}, got {top_k!r}")
        want_logits = params.get("return_logits", False)
        if not isinstance(want_logits, bool):
            raise BadInput(f"parameter return_logits must be true or false, got {want_logits!r}")
        return top_k, want_logits

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise BadInput("the batch is empty: send at least one image")
        limit = min(self.config.max_request_images, self.max_batch())
        if n > limit:
            raise PayloadTooLarge(f"{n} images in one request; the limit is {limit} (split the request)")

    async def _decode(self, images: list[bytes]) -> Payload:
        """A JPEG batch for the GPU (decoded by the device worker with nvJPEG), or CPU-decoded crops.

        Every image is checked here, on the request path, so limits and bad headers fail
        this request alone. A request with any image nvJPEG should not take (PNG, CMYK,
        ...) is decoded on the CPU in the thread pool, PIL releasing the GIL.
        """
        t0 = time.perf_counter()
        cfg = self.config
        frames = (
            [gpu_frame(d, max_pixels=cfg.max_image_pixels, max_bytes=cfg.max_image_bytes) for d in images]
            if self._gpu_decode
            else [None]
        )
        if all(f is not None for f in frames) and not self._cpu_share.take(len(images)):
            m.later_observe(m.PREPROCESS_SECONDS, time.perf_counter() - t0)
            return JpegBatch(images, frames=bytes(f or 0 for f in frames))
        loop = asyncio.get_running_loop()

        def one(data: bytes) -> np.ndarray:
            return decode_and_crop(data, max_pixels=cfg.max_image_pixels, max_bytes=cfg.max_image_bytes)

        self._cpu_share.decoding += len(images)
        try:
            if len(images) == 1:
                crops = [await loop.run_in_executor(self._decode_pool, one, images[0])]
            else:
                crops = list(await asyncio.gather(*(loop.run_in_executor(self._decode_pool, one, d) for d in images)))
        finally:
            self._cpu_share.decoding -= len(images)
        m.later_observe(m.PREPROCESS_SECONDS, time.perf_counter() - t0)
        return np.stack(crops)

    async def _infer(self, payload: Payload) -> np.ndarray:
        if self.batcher is None:
            raise Overloaded("model is not loaded yet")
        deadline = time.monotonic() + self.config.request_timeout_s
        if isinstance(payload, np.ndarray):
            import torch  # this process runs the model: torch is loaded

            payload = torch.from_numpy(payload)
        out = await self.batcher.submit(payload, payload_size(payload), deadline=deadline)
        logits: np.ndarray = out.numpy()
        return logits


def _v1_image_bytes(i: int, inst: Any) -> bytes:
    b64: Any = None
    if isinstance(inst, dict):
        image = inst.get("image", inst)
        b64 = image.get("b64") if isinstance(image, dict) else image
    elif isinstance(inst, str):
        b64 = inst
    if not isinstance(b64, str):
        raise BadInput(f'instance {i}: expected {{"image": {{"b64": "<base64 image>"}}}}')
    return _b64decode(b64, f"instance {i}")


def _b64decode(s: str, where: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"{where}: invalid base64 ({e})") from e


def _bytes_items(inp: InferInput) -> list[bytes]:
    shape = list(inp.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 0:
        raise BadInput(f"BYTES input {inp.name!r} must have shape [N] or [N,1], got {shape}")
    try:
        arr = inp.as_numpy()
    except (ValueError, IndexError, struct.error, InvalidInput) as e:
        raise BadInput(f"BYTES input {inp.name!r} does not match its shape {shape}: {e}") from e
    items: list[bytes] = []
    for k, v in enumerate(arr.reshape(-1)):
        if isinstance(v, bytes | bytearray):
            items.append(bytes(v))  # binary extension and gRPC carry raw bytes
        elif isinstance(v, str):
            items.append(_b64decode(v, f"element {k} of {inp.name!r}"))  # JSON carries base64 text
        else:
            raise BadInput(f"element {k} of {inp.name!r} is not bytes or a base64 string")
    return items


def _tensor_input(inp: InferInput, max_images: int) -> np.ndarray:
    shape = list(inp.shape)
    expected = [3, CROP_SIZE, CROP_SIZE]
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 0:
        raise BadInput(f"tensor input {inp.name!r} must have shape [N,3,{CROP_SIZE},{CROP_SIZE}], got {shape}")
    if shape[0] > max_images:
        raise PayloadTooLarge(f"{shape[0]} images in one request; the limit is {max_images} (split the request)")
    dtype = TENSOR_DTYPES[inp.datatype]
    try:
        raw = getattr(inp, "_raw_data", None)
        if raw is not None:
            arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            arr = np.asarray(inp.data, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError) as e:
        raise BadInput(
            f"tensor input {inp.name!r}: data does not match datatype {inp.datatype} and shape {shape}: {e}"
        ) from e
    if arr.dtype != np.uint8 and not np.isfinite(arr).all():
        raise BadInput(f"tensor input {inp.name!r} contains NaN or Inf")
    return arr.copy() if arr.dtype == np.uint8 else arr.astype(np.float32)  # a copy: the body is freed


def _plain_parameters(params: Any) -> dict[str, Any] | None:
    """REST parameters are a dict already; gRPC's are a map of InferParameter messages."""
    if params is None or isinstance(params, dict):
        return params
    plain: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice") if hasattr(value, "WhichOneof") else None
        plain[key] = getattr(value, which) if which else value
    return plain


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and classes of the ``k`` largest, per row, largest first (numpy: the
    front ends do not load torch for two small ops)."""
    x = logits.astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    if k < probs.shape[1]:
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    picked = np.take_along_axis(probs, top, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    classes = np.take_along_axis(top, order, axis=1).astype(np.int64)
    return np.take_along_axis(picked, order, axis=1).astype(np.float32), classes


def _grpc_error(e: ServerError) -> Exception:
    from grpc_interceptor import exceptions as grpc_exc

    mapped: Exception
    if isinstance(e, PayloadTooLarge | Overloaded):
        mapped = grpc_exc.ResourceExhausted(str(e))
    elif isinstance(e, DeadlineExceeded):
        mapped = grpc_exc.DeadlineExceeded(str(e))
    else:
        mapped = InvalidInput(str(e))
    return mapped
