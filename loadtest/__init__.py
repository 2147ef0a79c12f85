"""Load tests of the DenseNet-121 predictor: Locust users and shapes, pod watcher, in-pod metrics, report.

``locust -f loadtest/`` loads ``users.py`` and ``shapes.py`` (Locust skips files whose
names start with ``_``, which hold the helpers, and the ``report`` package). Nothing
here imports kserve or ``model_server``: gevent's monkey-patching breaks kserve in the
same process.
"""
