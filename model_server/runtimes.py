"""Runners: load an artifact by its ``runtime`` field and run uint8 or normalised batches on a device.

Every runner takes a host tensor ``[N,3,224,224]``, either uint8 RGB pixels (normalised
on the device) or float already-normalised input, and returns float32 logits ``[N,1000]``
on the host. ``optimize`` uses these same loaders to validate what it builds, so what is
checked offline is exactly what is served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model_server import ArtifactError
from model_server.artifact import payload_path
from model_server.preprocess import normalize
from optimize.registry import CROP_SIZE, NUM_CLASSES

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ArtifactError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch)
    return buckets


class Runner:
    """Base runner: device placement, on-device normalisation, optional padding to buckets.

    Attributes:
        device: where the model runs.
        dtype: the dtype the model takes as input.
        channels_last: whether the input is laid out NHWC.
        pad_to_bucket: pad batches to the next bucket (static-shape runtimes need it).
        cuda_graphs: capture one CUDA graph per bucket at warm-up and replay it (CUDA only;
            set from the manifest's ``options.cuda_graphs``). ``options.cudnn_benchmark`` turns on
            ``torch.backends.cudnn.benchmark`` (CUDA only).
    """

    pad_to_bucket = False

    def __init__(self, manifest: dict[str, Any], device: torch.device) -> None:
        self.manifest = manifest
        self.device = device
        self.options: dict[str, Any] = dict(manifest.get("options") or {})
        self.dtype = _DTYPES.get(manifest["precision"], torch.float32)
        self.channels_last = bool(manifest.get("channels_last", False))
        self.max_batch = int(manifest["input"].get("max_batch", 64))
        self.buckets = batch_buckets(self.max_batch)
        self.cuda_graphs = bool(self.options.get("cuda_graphs")) and device.type == "cuda"
        if self.cuda_graphs:
            self.pad_to_bucket = True
        if self.options.get("cudnn_benchmark") and device.type == "cuda":
            # cuDNN times its convolution algorithms on each shape's first call (the warm-up runs
            # every bucket before ready, and before any graph capture); process-wide, and a server
            # serves one artifact. Set by the fused AOTI variant (see its registry entry).
            torch.backends.cudnn.benchmark = True
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        # Per bucket, a second small graph from pixels to the model's input (normalise, cast, layout),
        # reading rows of one shared float32 pixel buffer; see :meth:`pixel_rows`.
        self._input_graphs: dict[int, Any] = {}
        self._pixels: torch.Tensor | None = None
        self._input_pool: Any = None  # one memory pool for every input graph: they never run at once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on a device tensor already in its dtype and layout."""
        raise NotImplementedError

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        x = normalize(x, self.dtype) if x.dtype == torch.uint8 else x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """Forward a prepared device tensor, replaying the bucket's CUDA graph when one was captured."""
        graph = self._graphs.get(x.shape[0])
        if graph is None:
            return self.forward(x)
        g, static_in, static_out = graph
        static_in.copy_(x)
        g.replay()
        return static_out

    def _bucket(self, n: int) -> int | None:
        """The smallest batch bucket holding ``n`` images (None above the largest)."""
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        rows = self.pixel_rows(n) if batch.dtype == torch.uint8 else None
        if rows is not None:
            # uint8 pixels through the bucket's input graph and the model's: six host-side calls instead
            # of fourteen (padding, normalisation, layout and copies one op each), which at batch 1 on the
            # H100 host took 0.35 ms of CPU before the model graph could start (request_anatomy.py).
            rows.copy_(batch, non_blocking=True)
            return self.run_filled(n)
        if self.pad_to_bucket:
            size = self._bucket(n) or n
            if size > n:
                batch = torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])
        out = self.run_device(self.prepare(batch))
        return out[:n].float().cpu()

    def pixel_rows(self, n: int) -> torch.Tensor | None:
        """Rows ``:n`` of the input graphs' float32 pixel buffer, for a caller that writes a batch's
        pixels (0..255, integral) there itself, on the current stream, before :meth:`run_filled`;
        None where ``n``'s bucket has no input graph. Rows ``n:bucket`` keep an earlier batch's
        pixels: every row is computed on its own and only ``n`` are returned."""
        if self._pixels is None or self._bucket(n) not in self._input_graphs:
            return None
        return self._pixels[:n]

    def run_filled(self, n: int) -> torch.Tensor:
        """Host logits ``[n,1000]`` of the ``n`` rows :meth:`pixel_rows` handed out, written already."""
        size = self._bucket(n)
        assert size is not None
        self._input_graphs[size].replay()
        graph, _, static_out = self._graphs[size]
        graph.replay()
        # The copy first, then the cast on the host: one CUDA op fewer on the request's path (the
        # logits are 2 KB at batch 1), and FP16 to FP32 is exact either way.
        return static_out[:n].cpu().float()

    def capture_cuda_graphs(self, *, beside: threading.Thread | None = None) -> None:
        """Capture one CUDA graph per bucket (after a warm-up run on a side stream, as CUDA graphs need).

        ``beside``: a thread that may still be using CUDA (the early nvJPEG warm-up). While it runs
        the capture forbids unsafe calls in this thread only (``capture_error_mode="thread_local"``);
        should a capture still fail, that thread is waited for and the bucket captured again.
        """
        took: dict[int, float] = {}
        for b in self.buckets:
            t0 = time.perf_counter()
            alongside = beside is not None and beside.is_alive()
            captured = self._capture(b, "thread_local" if alongside else "global")
            if isinstance(captured, RuntimeError) and alongside and beside is not None:
                log.warning("CUDA graph capture beside %s failed for batch %d (%s); waiting for it",
                            beside.name, b, captured)  # fmt: skip
                beside.join()
                captured = self._capture(b, "global")
            if isinstance(captured, RuntimeError):  # a runtime that cannot be captured still serves, uncaptured
                log.warning("CUDA graph capture failed for batch %d (%s); running it without a graph", b, captured)
                continue
            self._graphs[b] = captured
            inputs = self._capture_input(b, captured[1], "thread_local" if alongside else "global")
            if isinstance(inputs, RuntimeError):
                log.warning("input graph capture failed for batch %d (%s); normalising outside it", b, inputs)
            else:
                self._input_graphs[b] = inputs
            took[b] = round(time.perf_counter() - t0, 2)
        log.info("captured CUDA graphs for buckets %s in %.2fs (seconds per bucket: %s)",
                 sorted(self._graphs), sum(took.values()), took)  # fmt: skip

    def _capture(self, b: int, mode: str) -> tuple[Any, torch.Tensor, torch.Tensor] | RuntimeError:
        """Bucket ``b``'s graph with its static input and output, or the error that stopped the capture."""
        static_in = self.prepare(torch.zeros((b, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)).clone()
        captured = self._graph_of(lambda: self.forward(static_in), mode)
        if isinstance(captured, RuntimeError):
            return captured
        graph, static_out = captured
        return graph, static_in, static_out

    def _graph_of(self, fn: Callable[[], Any], mode: str, pool: Any = None) -> tuple[Any, Any] | RuntimeError:
        """``fn`` run once on a side stream (first call per shape: cuDNN plans, kernels, allocator pools),
        then captured into a CUDA graph: the graph and what the captured call returned, or the error."""
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                out = fn()
        except RuntimeError as e:
            torch.cuda.synchronize(self.device)
            return e
        return graph, out

    def _capture_input(self, b: int, static_in: torch.Tensor, mode: str) -> Any | RuntimeError:
        """Bucket ``b``'s input graph: rows ``:b`` of the shared float32 pixel buffer, normalised into
        the model graph's static input (the same ops as :meth:`prepare`, so replays match it)."""
        if self._pixels is None:
            shape = (self.buckets[-1], 3, CROP_SIZE, CROP_SIZE)
            self._pixels = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self._input_pool = torch.cuda.graph_pool_handle()
        pixels = self._pixels[:b]
        captured = self._graph_of(lambda: static_in.copy_(self._from_pixels(pixels)), mode, self._input_pool)
        return captured if isinstance(captured, RuntimeError) else captured[0]

    def _from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def warm_up(self, *, beside: threading.Thread | None = None) -> None:
        """Run every batch bucket once so no first-call cost reaches a request (``beside``: see
        :meth:`capture_cuda_graphs`)."""
        if self.cuda_graphs and not self._graphs:
            self.capture_cuda_graphs(beside=beside)
        for b in self.buckets:
            self(torch.zeros((b, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def warm_device_libraries(device: torch.device) -> None:
    """Load cuDNN and cuBLAS and create their handles with a tiny convolution and matrix product in
    FP16 channels-last and FP32 (what the first warm-up batch would otherwise pay, about half a
    second of the first CUDA graph capture on the H100), so an early thread can do it while the
    weights load. Handles made in another thread go back to PyTorch's pool when it ends."""
    with torch.inference_mode():
        for dtype in (torch.float16, torch.float32):
            x = torch.zeros((1, 8, 8, 8), device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.zeros((8, 8, 3, 3), device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            torch.nn.functional.conv2d(x, w, padding=1)
            torch.nn.functional.linear(torch.zeros((2, 8), device=device, dtype=dtype), w.reshape(8, -1)[:, :8])
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``__format__`` of a payload that stores pruned weights as a bitmask plus the kept values.
MASKED_FORMAT = "masked-state-dict-v1"


def densify_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Turn a masked payload back into a dense state dict (a plain state dict passes through).

    A masked payload is ``{"__format__": MASKED_FORMAT, "dense": {name: tensor},
    "masked": {name: {"shape": [..], "mask": uint8 bit-packed, "values": tensor}}}``:
    every pruned weight keeps 1 bit per element plus its non-zero values.
    """
    if payload.get("__format__") != MASKED_FORMAT:
        return payload
    state: dict[str, torch.Tensor] = dict(payload["dense"])
    for name, rec in payload["masked"].items():
        shape = [int(d) for d in rec["shape"]]
        numel = 1
        for d in shape:
            numel *= d
        bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        mask = (rec["mask"].unsqueeze(1) & bits).ne(0).reshape(-1)[:numel]
        values: torch.Tensor = rec["values"]
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        state[name] = dense.reshape(shape)
    return state


def densenet_for_state(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision's DenseNet-121 with each conv, batch norm and linear resized to the state dict's shapes.

    Structured pruning removes channels, so a pruned state dict no longer fits the stock
    model; rebuilding the modules from the tensor shapes needs no pickled module objects.
    """
    import torchvision
    from torch import nn

    model = torchvision.models.densenet121(weights=None, num_classes=NUM_CLASSES)
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None or tuple(weight.shape) == tuple(getattr(module, "weight").shape):  # noqa: B009
            continue
        new: nn.Module
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(
                weight.shape[1] * module.groups,
                weight.shape[0],
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                groups=module.groups,
                bias=module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], eps=module.eps, momentum=module.momentum)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        else:
            raise ArtifactError(f"state dict resizes {name} ({type(module).__name__}), which cannot be rebuilt")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    result: nn.Module = model
    return result


class TorchEagerRunner(Runner):
    """A torchvision DenseNet-121 rebuilt from a state dict loaded with ``weights_only=True``.

    Handles plain state dicts (FP32/FP16/BF16), masked (unstructured-pruned) payloads, channel-pruned
    shapes, ``torch.autocast`` (``options.autocast``: FP32 weights and input, half compute) and 2:4
    semi-structured sparse layers on CUDA (``options.sparse24``).
    """

    def __init__(self, manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> None:
        super().__init__(manifest, device)
        self.autocast_dtype: torch.dtype | None = None
        if self.options.get("autocast"):
            # AMP keeps FP32 weights and input; autocast picks half precision per op.
            self.autocast_dtype, self.dtype = self.dtype, torch.float32
        payload = torch.load(payload_path(artifact_dir, manifest, "model"), map_location="cpu", weights_only=True)
        state = densify_state(payload)
        model = densenet_for_state(state)
        model.load_state_dict(state)
        model = model.to(device=device, dtype=self.dtype).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.options.get("sparse24"):
            if device.type != "cuda":
                raise ArtifactError("2:4 semi-structured sparse kernels exist only on CUDA GPUs")
            self.sparse_layers = sparsify_model(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out: torch.Tensor = self.model(x)
            return out
        out = self.model(x)
        return out


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Zero the two smallest-magnitude weights of every group of four along the input dimension."""
    w2 = weight.reshape(weight.shape[0], -1)
    groups = w2.reshape(w2.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(weight.shape)


def sparse24_eligible(module: torch.nn.Module) -> bool:
    """1x1 convolutions (a matrix multiply on NHWC activations) and linears whose input width is a
    multiple of 64 (the strictest of cuSPARSELt's and CUTLASS's FP16 shape constraints)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features % 64 == 0
    if isinstance(module, nn.Conv2d):
        return (
            module.kernel_size == (1, 1)
            and module.stride == (1, 1)
            and module.groups == 1
            and module.padding in ((0, 0), "valid")
            and module.in_channels % 64 == 0
        )
    return False


class SparseMatmul(torch.nn.Module):
    """A 1x1 convolution or linear layer whose weight is a 2:4 semi-structured sparse matrix.

    A 1x1 convolution over NHWC activations is ``[N*H*W, Cin] @ W.T``; the output rows are
    padded to a multiple of 32 because the sparse kernels need it (the classifier has 1000).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        w = weight.detach()
        self.conv = isinstance(module, torch.nn.Conv2d)
        self.out_features = int(w.shape[0])
        w2 = w.reshape(w.shape[0], -1)
        pad = (-w2.shape[0]) % 32
        if pad:
            w2 = torch.cat([w2, w2.new_zeros((pad, w2.shape[1]))])
        self.weight = torch.nn.Parameter(to_sparse_semi_structured(w2.contiguous()), requires_grad=False)
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if self.conv:
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)
            out = F.linear(rows, self.weight)[:, : self.out_features]
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(n, h, w, self.out_features).permute(0, 3, 1, 2)
        out = F.linear(x, self.weight)[..., : self.out_features]
        return out if self.bias is None else out + self.bias


def sparsify_model(model: torch.nn.Module) -> list[str]:
    """Swap every eligible layer (already 2:4-pruned by ``optimize``) for a :class:`SparseMatmul`."""
    from torch.sparse import SparseSemiStructuredTensor

    # cuSPARSELt is faster where present; CUTLASS kernels ship inside torch itself.
    SparseSemiStructuredTensor._FORCE_CUTLASS = not torch.backends.cusparselt.is_available()
    swapped = []
    for name, module in list(model.named_modules()):
        if name and sparse24_eligible(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, SparseMatmul(module))
            swapped.append(name)
    log.info("2:4 semi-structured sparse kernels on %d layers", len(swapped))
    return swapped


class TorchScriptRunner(Runner):
    """A TorchScript archive (code plus tensors, no Python pickle of objects) from ``torch.jit.load``."""

    def __init__(self, manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> None:
        super().__init__(manifest, device)
        self.model = torch.jit.load(  # type: ignore[no-untyped-call]
            str(payload_path(artifact_dir, manifest, "model")), map_location=device
        )
        self.model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


class OnnxRuntimeRunner(Runner):
    """An ONNX model on ONNX Runtime: TensorRT EP (when its libraries load), CUDA EP with I/O binding
    on a GPU, the CPU EP otherwise. Normalisation stays in torch (on the device), like every runner."""

    def __init__(self, manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> None:
        super().__init__(manifest, device)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if device.type == "cpu":
            # Same thread count as torch's intra-op pool, so CPU comparisons between runtimes are fair.
            so.intra_op_num_threads = torch.get_num_threads()
        path = str(payload_path(artifact_dir, manifest, "model"))
        self.providers = self._providers(ort, device, str(manifest.get("precision", "")))
        self.session = ort.InferenceSession(path, so, providers=self.providers)
        self.active_providers: list[str] = self.session.get_providers()
        if device.type == "cuda" and "CUDAExecutionProvider" not in self.active_providers:
            raise ArtifactError(f"ONNX Runtime could not start its CUDA provider here (got {self.active_providers})")
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.dtype = torch.float16 if "float16" in inp.type else torch.float32
        log.info("onnxruntime providers: %s", self.active_providers)

    @staticmethod
    def _providers(ort: Any, device: torch.device, precision: str) -> list[Any]:
        if device.type != "cuda":
            return ["CPUExecutionProvider"]
        if hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds the CUDA/cuDNN libraries of the torch wheels this way.
            ort.preload_dlls()
        idx = device.index or 0
        providers: list[Any] = []
        if "TensorrtExecutionProvider" in ort.get_available_providers() and _tensorrt_present():
            providers.append(("TensorrtExecutionProvider", {"device_id": idx, "trt_fp16_enable": True}))
        cuda_options: dict[str, Any] = {"device_id": idx, "cudnn_conv_algo_search": "EXHAUSTIVE"}
        if precision == "fp32":
            # ORT's CUDA EP runs FP32 convolutions in TF32 by default: max logit error 2.4e-3 against
            # the FP32 reference on the H100, over the 1e-3 gate. FP32 means FP32 here, as in torch.
            cuda_options["use_tf32"] = 0
        providers.append(("CUDAExecutionProvider", cuda_options))
        providers.append("CPUExecutionProvider")
        return providers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            res = self.session.run([self.output_name], {self.input_name: x.contiguous().numpy()})
            return torch.from_numpy(res[0])
        import numpy as np

        x = x.contiguous()
        out = torch.empty((x.shape[0], NUM_CLASSES), dtype=x.dtype, device=self.device)
        binding = self.session.io_binding()
        np_dtype = np.float16 if x.dtype == torch.float16 else np.float32
        idx = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", idx, np_dtype, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", idx, np_dtype, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out


def _tensorrt_present() -> bool:
    """Whether TensorRT's own libraries are importable (ORT lists the TensorRT EP even without them)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None or importlib.util.find_spec("tensorrt_libs") is not None


class AotiPackage:
    """One ``.pt2`` loaded by torch's C++ package loader: a tensor in, the logits out.

    ``torch._inductor.aoti_load_package`` wraps the same loader but, after loading, compares the
    CPU's vector ISA with the package's for a warning, and finds the ISA by compiling and loading
    a probe per ISA with the C++ compiler (``pick_vec_isa``): 48 of the 52 s from process start to
    ready on the H100 host (``benchmarks/aoti_load_time.py``), plus about 6 s importing
    ``torch._inductor``. A compiled package needs neither, so the server calls the loader itself.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._run = getattr(loader, "boxed_run", None) or loader.run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._run([x])[0]
        return out


def load_aoti_package(path: Path, *, run_single_threaded: bool, device_index: int) -> Callable[..., Any]:
    """Load ``path`` with the C++ loader (no inductor import, no ISA probe); torch's Python loader
    with the probe switched off if this torch's loader takes other arguments."""
    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_cls is not None:
        try:
            return AotiPackage(loader_cls(str(path), "model", run_single_threaded, 1, device_index))
        except TypeError as e:  # another signature in this torch: fall back below
            log.warning(
                "AOTIModelPackageLoader(%s) refused the arguments (%s): loading through torch._inductor", path, e
            )
    from torch._inductor import aoti_load_package, config, cpu_vec_isa

    probed = cpu_vec_isa.valid_vec_isa_list.cache_info().currsize > 0
    with config.patch({"cpp.vec_isa_ok": False}):  # the ISA is only compared for a warning
        package = aoti_load_package(str(path), run_single_threaded=run_single_threaded, device_index=device_index)
    if not probed:
        cpu_vec_isa.valid_vec_isa_list.cache_clear()  # a later compile in this process probes for real
    return package


class AotiRunner(Runner):
    """AOTInductor packages (``.pt2``, compiled kernels inside), one per batch bucket; nothing compiles at load.

    The manifest's payload names ``bucket_<B>`` files (one file for every bucket when its batch
    dimension is dynamic); batches are padded to the next bucket.
    CUDA must be initialised before a CUDA package is loaded (see ``benchmarks/aoti_fresh_process.py``).
    """

    pad_to_bucket = True

    def __init__(self, manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> None:
        super().__init__(manifest, device)
        if device.type == "cuda":
            # A fresh process has no current CUDA context until torch creates one; the package
            # loader's cubin loading needs it, so initialise CUDA and pick the device first.
            torch.cuda.init()  # type: ignore[no-untyped-call]
            torch.cuda.set_device(device.index or 0)
            torch.empty(1, device=device)
        roles = {int(k.split("_", 1)[1]): v for k, v in manifest["payload"].items() if k.startswith("bucket_")}
        if not roles:
            raise ArtifactError(f"{manifest['slug']} names no bucket_<B> AOTInductor packages")
        self.buckets = sorted(roles)
        self.max_batch = self.buckets[-1]
        # run_single_threaded: the container's default run() synchronises on an event of its own,
        # which a stream being captured into a CUDA graph refuses ("operation not permitted when
        # stream is capturing"); the single-threaded entry point launches kernels only. The device
        # worker is one thread, so nothing is lost.
        # A package with a dynamic batch dimension is named by several buckets: loaded once.
        index = (device.index or 0) if device.type == "cuda" else -1
        loaded = {
            name: load_aoti_package(artifact_dir / name, run_single_threaded=self.cuda_graphs, device_index=index)
            for name in sorted(set(roles.values()))
        }
        self.packages = {b: loaded[name] for b, name in roles.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        package = self.packages.get(n)
        if package is None:
            # A bucket list trimmed by the server (e.g. --max_batch_size 24) can ask for a batch no
            # package was compiled for: run the next larger package on a zero-padded batch.
            size = next((b for b in sorted(self.packages) if b >= n), None)
            if size is None:
                raise ArtifactError(f"batch {n} exceeds the largest AOTInductor package ({max(self.packages)})")
            pad = x.new_zeros((size - n, *x.shape[1:]))
            if self.channels_last:
                pad = pad.contiguous(memory_format=torch.channels_last)
            padded = torch.cat([x, pad])
            if self.channels_last:
                padded = padded.contiguous(memory_format=torch.channels_last)
            out: torch.Tensor = self.packages[size](padded)
            return out[:n]
        out = package(x)
        return out


RunnerFactory = Callable[[dict[str, Any], Path, torch.device], Runner]

#: runtime name (``variant.json``'s ``runtime``) -> loader. Techniques register theirs here.
RUNNERS: dict[str, RunnerFactory] = {
    "torch-eager": TorchEagerRunner,
    "torchscript": TorchScriptRunner,
    "onnxruntime": OnnxRuntimeRunner,
    "aoti": AotiRunner,
}


def load_runner(manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> Runner:
    """Load the artifact's model with the runner its ``runtime`` names.

    Raises:
        ArtifactError: unknown runtime, or an artifact built for a device this machine lacks.
    """
    runtime = manifest["runtime"]
    factory = RUNNERS.get(runtime)
    if factory is None:
        raise ArtifactError(f"artifact runtime {runtime!r} is not supported; valid: {', '.join(sorted(RUNNERS))}")
    devices = manifest.get("devices", ["cpu", "cuda"])
    if device.type not in devices:
        raise ArtifactError(
            f"artifact {manifest['slug']} runs on {', '.join(devices)}, not on {device.type}; "
            f"pick another --device or another variant"
        )
    if manifest["precision"] == "fp32":
        # An FP32 variant is checked against the FP32 reference at 1e-3: TF32 convolutions would break that.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return factory(manifest, artifact_dir, device)
