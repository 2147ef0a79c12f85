"""What inductor makes of the block-buffer DenseNet for an H100, on a machine without a GPU.

The fused AOTInductor package ran 62 kernels that stored NaN over tensors before the Triton kernels
wrote them (session 12's trace). This probe found why, on the 2-core CPU machine: it builds the
network (``optimize/rewrites.py``) on *fake* CUDA tensors (``FakeTensorMode``: shapes, no memory),
exports it with ``torch.export`` and runs ``aoti_compile_and_package`` with an sm90 target for
Triton and an H100's device properties stubbed in, up to inductor's scheduler: everything is
lowered, nothing is compiled or launched. It reports the lowered operations by kind, and every
buffer whose computation is a constant NaN (a copy of uninitialised memory: a load from a
zero-size buffer reads NaN), with the source line that allocated it.

``--naive-empty`` allocates the channels-last tensors with ``torch.empty(memory_format=...)`` as
the code did before session 13 instead of ``kernels.empty_channels_last``: 62 fills against 0.

It patches torch's CUDA device queries and Triton's active driver for the whole process: run it as
a script, not inside another program. The batch is static (a dynamic batch stops in inductor's
size hints on fake inputs). Checked with torch 2.14 (and torch 2.11's reinplacing); inductor's
internals it hooks (``Scheduler.__init__``) may move in other releases.

Usage (repository root, no GPU needed; about a minute on 2 cores)::

    python benchmarks/lowering_probe.py                       # fused + 3x3 kernel + shared bottleneck
    python benchmarks/lowering_probe.py --options fused,fused_conv --naive-empty --json probe.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: BlockBufferDenseNet options this probe accepts (all need ``fused`` except ``pool_first``).
OPTIONS = ("fused", "pool_first", "fused_conv", "shared_bottleneck")
DEFAULT_OPTIONS = "fused,pool_first,fused_conv,shared_bottleneck"

_H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=65536, max_threads_per_block=1024, warp_size=32, total_memory=80 * 2**30,
    shared_memory_per_block_optin=232448, L2_cache_size=50 * 2**20, gcnArchName="",
)  # fmt: skip


class _Lowered(Exception):
    """Raised from the scheduler once the lowered operations are captured."""


def parse_options(text: str) -> dict[str, bool]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in OPTIONS]
    if bad:
        raise SystemExit(f"unknown option(s) {', '.join(bad)}; valid: {', '.join(OPTIONS)}")
    return {n: True for n in names}


def _pretend_h100() -> None:
    """Triton compiles for sm90 and inductor reads an H100's properties; no CUDA call reaches the driver."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class _Driver:
        def get_current_target(self) -> Any:
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_Driver())
    from torch._dynamo.device_interface import CudaInterface

    def props(*args: Any, **kwargs: Any) -> Any:
        return _H100

    def zero() -> int:
        return 0

    def one() -> int:
        return 1

    # torch.cuda's functions, and dynamo's device interface that copied them at import.
    torch.cuda.get_device_properties = props  # type: ignore[assignment]
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # type: ignore[assignment]
    torch.cuda.current_device = zero  # type: ignore[assignment]
    torch.cuda.device_count = one  # type: ignore[assignment]
    interface = {"get_device_properties": props, "get_compute_capability": lambda *a, **k: 90,
                 "current_device": zero, "device_count": one, "is_available": lambda: True}  # fmt: skip
    for name, fn in interface.items():
        setattr(CudaInterface, name, staticmethod(fn))
    for name in ("get_device_properties", "current_device"):
        setattr(CudaInterface.Worker, name, staticmethod(interface[name]))


def _naive_empty() -> None:
    """Allocate as before session 13: ``torch.empty(..., memory_format=torch.channels_last)``."""
    import torch

    from optimize import kernels

    def empty(n: Any, c: int, h: int, w: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty((n, c, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)

    kernels.empty_channels_last = empty


def _fake_network(fake_mode: Any, options: dict[str, bool]) -> Any:
    """torchvision's DenseNet-121, FP16 channels-last on fake CUDA tensors, under the rewrite."""
    import torch
    import torchvision

    from optimize.rewrites import BlockBufferDenseNet

    with fake_mode:
        with torch.device("cuda"):
            net = torchvision.models.densenet121(weights=None).eval()
        # ``Module.half()`` would swap fake tensors (refused); replace them one by one instead.
        for module in net.modules():
            for key, t in [(k, t) for k, t in module._parameters.items() if t is not None]:
                t = t.detach().half()
                if t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                module._parameters[key] = torch.nn.Parameter(t, requires_grad=False)
            for key, t in list(module._buffers.items()):
                if t is not None and t.is_floating_point():
                    module._buffers[key] = t.half()
        return BlockBufferDenseNet(net, **options).eval()


def _summarise(nodes: list[Any]) -> dict[str, Any]:
    kinds: Counter[str] = Counter(type(n).__name__ for n in nodes)
    fills = []
    for n in nodes:
        if type(n).__name__ != "ComputedBuffer":
            continue
        text = str(n)  # the node's loop body, printed
        if "ops.constant(nan" in text:
            lines = re.findall(r'File "[^"]*/(optimize/[^"]+)", line (\d+), in \w+,\n\s+(.+?),\n', text)
            fills.append({
                "buffer": getattr(n, "name", None),
                "size": [str(s) for s in n.get_size()],
                "source": [f"{f}:{line}: {code.strip()}" for f, line, code in lines],
            })  # fmt: skip
    return {"operations": dict(sorted(kinds.items())), "nan_fills": fills}


def probe(options: dict[str, bool], batch: int) -> dict[str, Any]:
    """Lower the rewritten network for an H100 and summarise the operations inductor would schedule."""
    import torch
    import torch._inductor.scheduler as scheduler
    from torch._guards import TracingContext, tracing
    from torch._inductor import aoti_compile_and_package
    from torch._subclasses.fake_tensor import FakeTensorMode

    captured: dict[str, Any] = {}

    def capture(self: Any, nodes: list[Any], *args: Any, **kwargs: Any) -> None:
        captured.update(_summarise(nodes))  # here: printing a node needs inductor's graph context
        raise _Lowered()

    scheduler.Scheduler.__init__ = capture  # type: ignore[method-assign]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_network(fake_mode, options)
    with fake_mode:
        example = torch.zeros((batch, 3, 224, 224), dtype=torch.half, device="cuda")
        example = example.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            program = torch.export.export(model, (example,))
    program._example_inputs = ((example,), {})  # the parameters' fake mode, not export's copy of it
    configs = {
        "aot_inductor.package_cpp_only": True,
        "max_autotune": False,
        "joint_graph_constant_folding": False,  # would run the zeros on a real device
        "shape_padding": False,  # would benchmark matrix products on a real device
    }
    t0 = time.perf_counter()
    try:
        with tracing(TracingContext(fake_mode)):
            aoti_compile_and_package(program, package_path=str(Path("/nonexistent") / "probe.pt2"),
                                     inductor_configs=configs)  # fmt: skip
    except Exception as e:  # inductor wraps what the scheduler hook raises
        if not captured:
            raise RuntimeError(f"inductor stopped before its scheduler: {e}") from e
    return {"lowering_s": round(time.perf_counter() - t0, 1), **captured}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--options", default=DEFAULT_OPTIONS, help=f"BlockBufferDenseNet options, from: {', '.join(OPTIONS)}"
    )
    ap.add_argument("--batch", type=int, default=2, help="static batch size (default 2)")
    ap.add_argument("--naive-empty", action="store_true", help="allocate with torch.empty(memory_format=...)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args(argv)
    options = parse_options(args.options)
    if args.batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {args.batch}")
    _pretend_h100()
    if args.naive_empty:
        _naive_empty()
    print(f"lowering DenseNet-121 {sorted(options)} at batch {args.batch} for an H100 on fake tensors...",
          file=sys.stderr, flush=True)  # fmt: skip
    report = {"options": sorted(options), "batch": args.batch, "naive_empty": args.naive_empty,
              **probe(options, args.batch)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("operations:", ", ".join(f"{k} {v}" for k, v in report["operations"].items()))
    print(f"NaN-filled buffers: {len(report['nan_fills'])}")
    for where, count in Counter(s for f in report["nan_fills"] for s in f["source"][:1]).most_common():
        print(f"  {count:3d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
