"""Writing a benchmark's JSON record: ``benchmarks/results/<date>-<gpu>-<name>.json`` and a copy under ``$OUT``.

Every record holds ``name``, ``command`` (the exact command line), ``date``, ``environ`` (GPU,
driver, versions: ``optimize.build.environment``) and ``metrics`` (unit-suffixed keys).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def write_record(
    name: str,
    script: str,
    argv: Sequence[str],
    device: torch.device,
    metrics: dict[str, Any],
    results_dir: Path,
    *,
    packages: tuple[str, ...] = ("torchvision", "pillow"),
) -> Path:
    """Write the record of one run of ``script`` (``benchmarks/<file>.py``) called with ``argv``; print its
    metrics (the command's output) and, on stderr, where it went."""
    from optimize.build import environment

    env = environment(device, packages=packages)
    gpu = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    date = dt.date.today().isoformat()
    record = {
        "name": name,
        "command": "python " + " ".join(shlex.quote(a) for a in [script, *argv]),
        "date": date,
        "environ": env,
        "metrics": metrics,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{date}-{gpu}-{name}.json"
    text = json.dumps(record, indent=1) + "\n"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return path
