"""pytest wiring for tests/cluster: puts this folder on sys.path and exposes the shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_testlib import knative_crd, kserve_crd, stub_env, sys_bin  # noqa: F401  (fixtures)
