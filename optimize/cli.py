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
    _add_build_options(b)

    bn = sub.add_parser("bench", help="build or reuse variants, time them, write CSV, plots, traces, analysis")
    bn.add_argument("--variant", action="append", dest="variants", metavar="SLUG", help="variant (repeatable)")
    bn.add_argument("--batch-sizes", default="1,4,8,16,32", help="comma-separated (default: 1,4,8,16,32)")
    bn.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU with a note), cpu, cuda")
    bn.add_argument("--output-dir", type=Path, default=Path("results"), help="CSV, plots, profiles/, models/")
    bn.add_argument(
        "--tensorboard-dir", type=Path, default=Path("logs/tensorboard"), help="(default: logs/tensorboard)"
    )
    bn.add_argument("--weights", default="imagenet", help="imagenet, random or PATH (for variants built here)")
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--val-dir", type=Path, help="labelled image folder for real top-1/top-5")
    bn.add_argument("--warmup", type=int, default=3, help="untimed calls before each window (default: 3)")
    bn.add_argument("--min-iters", type=int, default=5, help="timed calls at least (default: 5)")
    bn.add_argument("--max-iters", type=int, default=200, help="timed calls at most (default: 200)")
    bn.add_argument("--min-time-s", type=float, default=2.0, help="timed window at least (default: 2 s)")
    bn.add_argument("--no-profile", action="store_true", help="skip the torch.profiler trace per variant")
    bn.add_argument(
        "--threads", type=int, help="CPU threads for torch and ONNX Runtime alike (default: torch's, = cores)"
    )
    bn.add_argument("--readme", type=Path, help="also rewrite the marked results section of this Markdown file")
    return p


def _add_build_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--val-dir", type=Path, help="labelled image folder (one folder per synset) for real top-1/top-5")
    b.add_argument("--prune-amount", type=float, help="unstructured pruning amount (default: the registry's, 0.2)")
    b.add_argument("--prune-ratio", type=float, help="structured channel-pruning ratio (default: the registry's, 0.3)")
    b.add_argument(
        "--finetune-dir",
        type=Path,
        help="unlabelled image folder: BN recalibration (and --finetune-steps of distillation) after channel pruning",
    )
    b.add_argument("--finetune-steps", type=int, default=0, help="distillation steps after channel pruning")
    b.add_argument("--aoti-cache-dir", type=Path, help="keep compiled AOTInductor packages per bucket here")


def build_options(args: argparse.Namespace) -> dict[str, object]:
    """Builder overrides (``BuildContext.options``) from the command line."""
    opts: dict[str, object] = {}
    if getattr(args, "prune_amount", None) is not None:
        opts["prune_amount"] = args.prune_amount
    if getattr(args, "prune_ratio", None) is not None:
        opts["prune_ratio"] = args.prune_ratio
    if getattr(args, "finetune_dir", None) is not None:
        opts["finetune_dir"] = str(args.finetune_dir)
        opts["finetune_steps"] = args.finetune_steps
    if getattr(args, "aoti_cache_dir", None) is not None:
        opts["aoti_cache_dir"] = str(args.aoti_cache_dir)
    return opts


def _device_or_usage(name: str) -> torch.device:
    from model_server import ArtifactError
    from model_server.runtimes import resolve_device

    try:
        return resolve_device(name)
    except ArtifactError as e:
        raise SystemExit(f"error: --device: {e}") from e


def _variants(slugs: list[str] | None, device_type: str) -> list[registry.Variant]:
    """The variants named with --variant, or every variant that runs on ``device_type``."""
    if not slugs:
        return [v for v in registry.all_variants() if device_type in v.devices]
    try:
        return [registry.get(s) for s in slugs]
    except registry.RegistryError as e:
        raise SystemExit(f"error: --variant: {e}") from e


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
    variants = _variants(args.variants, device.type)
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
        options=build_options(args),
        val_dir=args.val_dir,
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


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from optimize import WeightsError
    from optimize.bench import BenchConfig, run_bench

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError as e:
        raise SystemExit(f"error: --batch-sizes: {e}") from e
    if not batch_sizes or min(batch_sizes) < 1:
        raise SystemExit("error: --batch-sizes must be positive integers")
    note = ""
    if args.device == "auto" and not torch.cuda.is_available():
        note = "device auto: no CUDA GPU visible, fell back to the CPU"
        print(f"note: {note}", file=sys.stderr)
    device = _device_or_usage(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        note = f"{note}; {torch.get_num_threads()} CPU threads".lstrip("; ")
    variants = _variants(args.variants, device.type)
    skipped = [v.slug for v in variants if device.type not in v.devices]
    if skipped:
        print(f"note: {', '.join(skipped)} do not run on {device.type}; skipped", file=sys.stderr)
    variants = [v for v in variants if device.type in v.devices]
    cfg = BenchConfig(
        batch_sizes=batch_sizes,
        device=device,
        output_dir=args.output_dir,
        tensorboard_dir=args.tensorboard_dir,
        warmup=args.warmup,
        min_iters=args.min_iters,
        max_iters=args.max_iters,
        min_time_s=args.min_time_s,
        profile=not args.no_profile,
        device_note=note,
    )
    torch.set_grad_enabled(False)
    try:
        rows, failures = run_bench(
            variants, cfg, weights=args.weights, seed=args.seed, val_dir=args.val_dir, readme=args.readme
        )
    except WeightsError as e:
        log.error("%s", e)
        return EXIT_FAIL
    print(f"results: {args.output_dir}/benchmark_results.csv  tensorboard: {args.tensorboard_dir}/")
    return EXIT_OK if rows and not failures else EXIT_FAIL


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
        if args.command == "bench":
            return cmd_bench(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_USAGE
        raise
    return EXIT_USAGE
