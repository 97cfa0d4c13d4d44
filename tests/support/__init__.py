"""Helpers for the tests (not tests themselves, and not fixtures: those live in conftest.py).

``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml), so a test imports these as
``from support.egress_servers import plain_server``, from any directory under ``tests/``.

* ``containers``: Python in a plain runc container, as a Kubernetes pod runs a kernel.
* ``egress_servers``: local HTTP servers (a plain one, a PyPI index, an npm registry, git).
* ``ipython_shell``: driving the extension in IPython's in-process shell (tests/test_magics_*).
* ``kernel_helpers``: a real ipykernel, its cells and iopub messages.
* ``leaks``: what a test may leave behind (runsc processes, containers, scratch dirs).
* ``nbval_status_shape``: the pytest plugin of the fallback nbval run.
* ``probes``: the hostile-probe harness of tests/security.
* ``user_switch``: copies an ordinary user can read.
"""
