"""``python -m optimize``: list the registry, build and check variants, benchmark them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from optimize import registry

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optimize", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="print the variant registry")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--deployable", action="store_true", help="only variants deployed by default")

    b = sub.add_parser("build", help="build variants, check each against the FP32 reference, write artifacts")
    b.add_argument(
        "--variant",
        action="append",
        dest="variants",
        metavar="SLUG",
        help="variant to build (repeatable); default: every variant that runs on the chosen device",
    )
    b.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (torchvision download and cache), 'random' (seeded), "
        "or PATH to a state dict (default: imagenet)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed for --weights random (default: 0)")
    b.add_argument(
        "--output-dir", type=Path, default=Path("artifacts"), help="where DIR/SLUG/ goes (default: artifacts)"
    )
    b.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda (default: auto)")
    b.add_argument("--max-batch", type=int, default=32, help="largest batch the artifact serves (default: 32)")
    return p


def _device_or_usage(name: str) -> torch.device:
    from model_server import ArtifactError
    from model_server.runtimes import resolve_device

    try:
        return resolve_device(name)
    except ArtifactError as e:
        raise SystemExit(f"error: --device: {e}") from e


def cmd_list(args: argparse.Namespace) -> int:
    variants = registry.deployable_variants() if args.deployable else registry.all_variants()
    if args.json:
        print(json.dumps([v.to_dict() for v in variants], indent=2))
        return EXIT_OK
    rows = [
        (v.slug, v.technique.value, v.precision.value, v.runtime.value, v.base or "-", ",".join(v.devices))
        for v in variants
    ]
    header = ("slug", "technique", "precision", "runtime", "base", "devices")
    _print_table(header, rows)
    return EXIT_OK


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def cmd_build(args: argparse.Namespace) -> int:
    import torch

    from optimize import WeightsError
    from optimize.build import build_all
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    device = _device_or_usage(args.device)
    if args.max_batch < 1:
        raise SystemExit(f"error: --max-batch must be >= 1, got {args.max_batch}")
    if args.variants:
        try:
            variants = [registry.get(s) for s in args.variants]
        except registry.RegistryError as e:
            raise SystemExit(f"error: --variant: {e}") from e
    else:
        variants = [v for v in registry.all_variants() if device.type in v.devices]
    try:
        reference, weights = load_reference(args.weights, seed=args.seed)
    except WeightsError as e:
        log.error("%s", e)
        return EXIT_FAIL
    images = sample_batch()
    log.info("building %d variant(s) on %s with %s weights", len(variants), device, weights.name)

    def progress(slug: str) -> None:
        print(
            f"[{variants.index(registry.get(slug)) + 1}/{len(variants)}] building {slug} ...",
            file=sys.stderr,
            flush=True,
        )

    torch.set_grad_enabled(False)
    outcomes = build_all(
        variants,
        reference=reference,
        weights=weights,
        images=images,
        output_dir=args.output_dir,
        device=device,
        max_batch=args.max_batch,
        progress=progress,
    )
    rows = []
    for o in outcomes:
        if o.ok and o.manifest:
            m = o.manifest["meta"]
            f = m["fidelity"]
            rows.append(
                (
                    o.slug,
                    "ok",
                    f"{m['file_size_mb']:.1f}",
                    f"{m['num_params'] / 1e6:.2f}" if m["num_params"] else "-",
                    f"{m['gflops']:.2f}" if m["gflops"] else "-",
                    f"{f['top1_agreement']:.3f}",
                    f"{f['top5_overlap']:.3f}",
                    f"{f['max_abs_logit_err']:.2e}",
                    f"{m['latency_ms_by_batch']['1']:.1f}",
                )
            )
        else:
            rows.append((o.slug, "FAILED", "-", "-", "-", "-", "-", "-", "-"))
    print(f"weights: {weights.name}   device: {device}   artifacts: {args.output_dir}/")
    _print_table(
        (
            "variant",
            "status",
            "size_mb",
            "params_m",
            "gflops",
            "top1_agree",
            "top5_overlap",
            "max_logit_err",
            "b1_latency_ms",
        ),
        rows,
    )
    for o in outcomes:
        if not o.ok:
            print(f"{o.slug}: {o.error}", file=sys.stderr)
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "list":
            return cmd_list(args)
        if args.command == "build":
            return cmd_build(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_USAGE
        raise
    return EXIT_USAGE
