"""Process-wide tuning of the garbage collector after start-up, for the device process and the front ends.

Torch-free (a front end never imports torch): both kinds of process call these at the same
points of their start-up.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_so_far() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``) without a
    collection first, so that :func:`settle_after_startup`'s full collection, on the path to ready,
    walks only what came after (85-190 ms less a process on the CPU here).

    Only where start-up leaves (almost) no cyclic garbage behind: after the imports (about 20
    unreachable objects measured) and after :func:`load_model` (none measured).
    """
    gc.freeze()


def settle_after_startup() -> None:
    """Collect once, then move every object alive after start-up (modules, the model, KServe's app)
    out of the garbage collector's reach (``gc.freeze``): later collections walk only what requests
    allocate, so no multi-millisecond full collection lands in a request's latency."""
    gc.collect()
    gc.freeze()
    log.debug("gc: %d start-up objects frozen", gc.get_freeze_count())
