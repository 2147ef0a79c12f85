"""Command line of the predictor: flags, then ``DENSENET_*`` environment variables, then defaults."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from model_server import ServerError
from model_server.predictor import ServingConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


def _env(name: str, default: str) -> str:
    return os.environ.get(f"DENSENET_{name}", default)


def _parser() -> argparse.ArgumentParser:
    d = ServingConfig()
    p = argparse.ArgumentParser(
        prog="python -m model_server",
        description="Serve one DenseNet-121 artifact over KServe v1, v2 (REST) and gRPC v2. "
        "Every flag falls back to the DENSENET_<FLAG> environment variable.",
    )
    p.add_argument("--model_dir", default=_env("MODEL_DIR", ""), help="artifact folder holding variant.json")
    p.add_argument(
        "--model_name", default=_env("MODEL_NAME", "densenet121"), help="name in the URL (default: densenet121)"
    )
    p.add_argument("--http_port", type=int, default=int(_env("HTTP_PORT", "8080")))
    p.add_argument("--grpc_port", type=int, default=int(_env("GRPC_PORT", "8081")))
    p.add_argument("--device", default=_env("DEVICE", d.device), help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--max_batch_size", type=int, default=int(_env("MAX_BATCH_SIZE", str(d.max_batch_size))))
    p.add_argument("--max_delay_ms", type=float, default=float(_env("MAX_DELAY_MS", str(d.max_delay_ms))))
    p.add_argument(
        "--max_queue_images", type=int, default=int(_env("MAX_QUEUE_IMAGES", str(d.max_queue_images))),
        help="images allowed to wait for the device; beyond it requests get 503 + Retry-After",
    )  # fmt: skip
    p.add_argument("--max_request_images", type=int, default=int(_env("MAX_REQUEST_IMAGES", str(d.max_request_images))))
    p.add_argument("--max_body_bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))))
    p.add_argument("--max_image_pixels", type=int, default=int(_env("MAX_IMAGE_PIXELS", str(d.max_image_pixels))))
    p.add_argument(
        "--request_timeout_s", type=float, default=float(_env("REQUEST_TIMEOUT_S", str(d.request_timeout_s)))
    )
    p.add_argument("--log_level", default=_env("LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model_dir:
        print("error: --model_dir (or DENSENET_MODEL_DIR) is required", file=sys.stderr)
        return 2
    for name in ("max_batch_size", "max_queue_images", "max_request_images", "max_body_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    config = ServingConfig(
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        max_queue_images=args.max_queue_images,
        max_request_images=args.max_request_images,
        max_image_pixels=args.max_image_pixels,
        request_timeout_s=args.request_timeout_s,
    )
    # kserve parses sys.argv when imported: import it only once our own flags are parsed.
    import kserve
    import kserve.model_server as kserve_server

    from model_server import metrics, rest
    from model_server.predictor import DenseNetPredictor

    model = DenseNetPredictor(args.model_name, Path(args.model_dir), config)
    try:
        model.load()
    except ServerError as e:
        log.error("cannot serve %s: %s", args.model_dir, e)
        return 1
    gpu = model.runner.device.index or 0 if model.runner and model.runner.device.type == "cuda" else None
    sampler = metrics.ResourceSampler(gpu_index=gpu)
    sampler.start()
    rest.install(kserve_server.app, model, max_body_bytes=args.max_body_bytes)
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_docs_url=False,
        enable_latency_logging=False,
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # KServe logs every request at INFO (access log and timing trace): too slow for the hot path.
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])
    return 0
