"""Imported first by this suite's conftest: Locust's gevent monkey-patching before urllib3 is used."""

from __future__ import annotations

import sys
import warnings


def import_locust_first() -> None:
    """Monkey-patch with gevent and import locust as early as this suite can.

    Pytest plugins installed next to it (schemathesis, anyio) import ssl or urllib3 before
    any conftest runs. urllib3 then holds the unpatched ``ssl.SSLContext``, and Locust's
    own ``create_urllib3_context()`` at import recurses forever; so patch here and hand
    urllib3 gevent's class. Nothing in this suite speaks TLS, hence the silenced warning.
    """
    from gevent import monkey

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", monkey.MonkeyPatchWarning)
        monkey.patch_all()
    if "urllib3.util.ssl_" in sys.modules:
        import ssl

        sys.modules["urllib3.util.ssl_"].SSLContext = ssl.SSLContext
    import locust  # noqa: F401


import_locust_first()
