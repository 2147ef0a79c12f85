"""One v1 inference through the Knative ingress, checked for shape (standard library only).

deploy-knative.sh runs it once per deployed variant. It sends a generated PNG (so no sample
file or third-party package is needed), with the route's Host header so it works without DNS.

Usage: python3 cluster/smoke_request.py --ingress http://127.0.0.1:80 --host NAME.NS.DOMAIN
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import struct
import sys
import urllib.error
import urllib.request
import zlib


def gradient_png(size: int = 64) -> bytes:
    """A small RGB gradient PNG, encoded with zlib only."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    rows = b"".join(
        b"\x00" + bytes(v for x in range(size) for v in (x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256))
        for y in range(size)
    )
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def check_response(body: dict[str, object], top_k: int) -> str:
    """Validate a v1 predict response; return a one-line summary or raise ValueError."""
    predictions = body.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != 1:
        raise ValueError(f"expected one prediction, got {str(body)[:200]}")
    first = predictions[0]
    if not isinstance(first, dict):
        raise ValueError(f"prediction is not an object: {str(first)[:200]}")
    classes, labels, probs = first.get("classes"), first.get("labels"), first.get("probabilities")
    if not (isinstance(classes, list) and isinstance(labels, list) and isinstance(probs, list)):
        raise ValueError(f"prediction lacks classes/labels/probabilities: {str(first)[:200]}")
    if not len(classes) == len(labels) == len(probs) == top_k:
        raise ValueError(f"expected top-{top_k}, got {len(classes)} classes")
    if any(a < b for a, b in itertools.pairwise(probs)):
        raise ValueError(f"probabilities are not sorted descending: {probs}")
    return f"top-1 {labels[0]!r} (class {classes[0]}, p={probs[0]:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingress", required=True, help="ingress base URL, e.g. http://127.0.0.1:80")
    parser.add_argument("--host", required=True, help="the route's host name (sent as Host header)")
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds; covers a cold start")
    args = parser.parse_args(argv)

    payload = {
        "instances": [{"image": {"b64": base64.b64encode(gradient_png()).decode()}}],
        "parameters": {"top_k": args.top_k},
    }
    request = urllib.request.Request(
        f"{args.ingress.rstrip('/')}/v1/models/{args.model}:predict",
        data=json.dumps(payload).encode(),
        headers={"Host": args.host, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = json.load(response)
        summary = check_response(body, args.top_k)
    except urllib.error.HTTPError as e:
        print(f"smoke inference on {args.host}: HTTP {e.code}: {e.read()[:300]!r}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        print(f"smoke inference on {args.host} failed: {e}", file=sys.stderr)
        return 1
    print(f"{args.host}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
