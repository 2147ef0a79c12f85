"""Probe: AOTInductor as a plain shared object (aot_compile + AOTIModelContainerRunnerCuda), loaded in a
fresh process, as a way around the .pt2 package loader that segfaults on the H100 machine (torch 2.11)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = r"""
import sys, time, json, torch
so, inp, ref = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda")
load_s = time.perf_counter() - t0
x = torch.load(inp).cuda()
out = runner.run([x])[0]
torch.cuda.synchronize()
print(json.dumps({"load_s": round(load_s, 2), "max_err": float((out.float().cpu() - torch.load(ref)).abs().max())}))
"""


def main() -> int:
    import torch
    import torchvision

    results = {}
    for name in ("densenet121",):
        model = torchvision.models.densenet121().eval().cuda().half().to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.half).contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
            so = torch._inductor.aot_compile(ep.module(), (x,), options={"aot_inductor.output_path": f"/tmp/{name}.so"})
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            ref = model(x).float().cpu()
        torch.save(x.cpu(), f"/tmp/{name}.in.pt")
        torch.save(ref, f"/tmp/{name}.ref.pt")
        p = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", CHILD, so, f"/tmp/{name}.in.pt", f"/tmp/{name}.ref.pt"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        results[name] = {
            "compile_s": round(compile_s, 1),
            "so": so,
            "child_rc": p.returncode,
            "child": p.stdout.strip()[-500:],
            "stderr": p.stderr[-1500:],
        }
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
