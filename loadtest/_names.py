"""Request names: ``"<protocol> <size> x<images>"``, written by the users and read back by the report."""

from __future__ import annotations

import re

_IMAGES_RE = re.compile(r"\sx(\d+)$")


def request_name(protocol: str, size: str, images: int) -> str:
    """The Locust name of a request; requests with equal names are grouped in Locust's stats."""
    return f"{protocol} {size} x{images}"


def images_in(name: str) -> int:
    """Images per request encoded in a request name (1 for names this package did not make)."""
    match = _IMAGES_RE.search(str(name))
    return int(match.group(1)) if match else 1
