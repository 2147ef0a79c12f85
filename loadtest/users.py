"""Locust users for the DenseNet-121 predictor: KServe v1, v2 JSON tensor, v2 binary tensor, v2 BYTES.

Run ``locust -f loadtest/ --host URL [UserClass ...]``. Every user sends real
photographs (``--image-sizes``, ``--images-per-request``), checks every answer (a 200
whose body lacks one sorted top-k result per image is a failure) and names requests
``"<protocol> <size> x<images>"`` so Locust groups them and the report can count
images. Tags select protocols: ``v1``, ``v2``, ``json``, ``binary``, ``tensor``,
``bytes`` (``--tags v2 --exclude-tags tensor``).

Bodies are built once per process and reused, so the load generator spends its CPU on
sending, not on base64 or JSON encoding.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from locust import FastHttpUser, tag, task

if __package__ in (None, ""):  # loaded by ``locust -f loadtest/`` as a top-level module
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import (
    _hooks,  # noqa: F401 - registers options and run-wide listeners
    _protocol,
)
from loadtest._names import request_name
from loadtest._payloads import Photo, parse_sizes, photo_set

#: Distinct bodies kept per (user class, size, images): enough to vary the photos, few enough to stay small.
BODIES_PER_KEY = 5


def _parse_counts(text: str) -> list[int]:
    counts = [int(part) for part in str(text).split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"--images-per-request must be positive integers, got {text!r}")
    return counts


@functools.cache
def _bodies(
    builder: Callable[..., _protocol.Prepared], model: str, size: str, images: int, options: tuple[tuple[str, Any], ...]
) -> tuple[_protocol.Prepared, ...]:
    photos = photo_set(size)
    bodies = []
    for first in range(min(BODIES_PER_KEY, len(photos))):
        chosen: Sequence[Photo] = [photos[(first + i) % len(photos)] for i in range(images)]
        bodies.append(builder(model, chosen, **dict(options)))
    return tuple(bodies)


class PredictorUser(FastHttpUser):
    """One client of the predictor. Subclasses set ``protocol`` and ``build``."""

    abstract = True
    #: Short protocol label used in request names.
    protocol: ClassVar[str] = ""
    #: Reused connections matter: a Knative route costs a TLS/TCP handshake per new one.
    network_timeout = 120.0
    connection_timeout = 60.0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        self.model = getattr(options, "model_name", "densenet121")
        self.sizes = parse_sizes(getattr(options, "image_sizes", "vga"))
        self.counts = _parse_counts(getattr(options, "images_per_request", "1"))
        self.top_k = int(getattr(options, "top_k", 5))
        self.tensor_dtype = getattr(options, "tensor_dtype", "uint8")
        self.think_time = float(getattr(options, "think_time", 0.0))
        host_header = getattr(options, "host_header", "")
        self.extra_headers = {"Host": host_header} if host_header else {}

    def wait_time(self) -> float:
        return self.think_time

    def builder_options(self) -> dict[str, Any]:
        """Keyword arguments for the body builder besides ``top_k``."""
        return {}

    #: The body builder of ``loadtest._protocol`` for this protocol.
    build: ClassVar[Callable[..., _protocol.Prepared]]

    def check(self, prepared: _protocol.Prepared, body: bytes, headers: Any) -> None:
        raise NotImplementedError

    def send(self) -> None:
        """Send one request of a random size and image count; check the answer."""
        size = random.choice(self.sizes)
        images = random.choice(self.counts)
        options = tuple(sorted({"top_k": self.top_k, **self.builder_options()}.items()))
        prepared = random.choice(_bodies(type(self).build, self.model, size, images, options))
        body: Any = prepared.body  # bytes go out as they are (FastHttpSession's hint says str)
        headers = {**prepared.headers, **self.extra_headers}
        with self.client.post(
            prepared.path,
            data=body,
            headers=headers,
            catch_response=True,
            name=request_name(self.protocol, size, images),
        ) as response:
            if response.status_code != 200:
                text = (response.text or "")[:200] if response.content else ""
                response.failure(f"HTTP {response.status_code}: {text}")
                return
            try:
                self.check(prepared, response.content or b"", response.headers)
            except _protocol.ResponseError as e:
                response.failure(str(e)[:300])
            else:
                response.success()


class V1Base64User(PredictorUser):
    """KServe v1 ``:predict`` with base64 JPEGs (``{"instances": [{"image": {"b64": ...}}]}``)."""

    protocol = "v1-b64"
    build = staticmethod(_protocol.v1_request)

    def check(self, prepared: _protocol.Prepared, body: bytes, headers: Any) -> None:
        _protocol.check_v1_response(body, images=prepared.images, top_k=self.top_k)

    @tag("v1", "json", "bytes")
    @task
    def predict(self) -> None:
        self.send()


class V2User(PredictorUser):
    abstract = True

    def check(self, prepared: _protocol.Prepared, body: bytes, headers: Any) -> None:
        _protocol.check_v2_response(body, headers, images=prepared.images, top_k=self.top_k)


class V2BytesUser(V2User):
    """v2 ``infer`` with a BYTES input of base64 JPEGs in JSON; the server decodes."""

    protocol = "v2-bytes-json"
    build = staticmethod(_protocol.v2_bytes_request)

    @tag("v2", "json", "bytes")
    @task
    def infer(self) -> None:
        self.send()


class V2BinaryBytesUser(V2User):
    """v2 ``infer`` with raw JPEG bytes through the binary-tensor extension (no base64, binary outputs)."""

    protocol = "v2-bytes-bin"
    build = staticmethod(_protocol.v2_binary_bytes_request)

    @tag("v2", "binary", "bytes")
    @task
    def infer(self) -> None:
        self.send()


class V2JsonTensorUser(V2User):
    """v2 ``infer`` with a client-preprocessed ``[N,3,224,224]`` tensor as JSON numbers (``--tensor-dtype``)."""

    protocol = "v2-tensor-json"
    build = staticmethod(_protocol.v2_tensor_request)

    def builder_options(self) -> dict[str, Any]:
        return {"dtype": "uint8" if self.tensor_dtype == "fp16" else self.tensor_dtype}

    @tag("v2", "json", "tensor")
    @task
    def infer(self) -> None:
        self.send()


class V2BinaryTensorUser(V2User):
    """v2 ``infer`` with a client-preprocessed tensor as raw bytes (binary-tensor extension)."""

    protocol = "v2-tensor-bin"
    build = staticmethod(_protocol.v2_binary_tensor_request)

    def builder_options(self) -> dict[str, Any]:
        return {"dtype": self.tensor_dtype}

    @tag("v2", "binary", "tensor")
    @task
    def infer(self) -> None:
        self.send()
