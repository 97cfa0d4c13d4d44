"""The exit-status rule, as a table (``result.returncode_of``): every backend and warm
sessions report through it."""

from __future__ import annotations

import pytest

from gvisor_magic.result import KILLED, RUNTIME_FAILURE, TIMEOUT_RETURNCODE, returncode_of


@pytest.mark.parametrize(("raw", "kwargs", "expected"), [
    (0, {}, 0),
    (3, {"init_status": "exit 3"}, 3),
    (-15, {}, -15),                                   # Popen's signal, as it is
    (137, {"init_status": "signal 9"}, -9),           # the runtime's 128+N, the init saw N
    (137, {"init_status": "exit 137"}, 137),          # exit(137) is not a signal
    (137, {}, 137),                                   # no report: nothing to refine
    (130, {"init_status": "signal 9"}, 130),          # a report that does not match
    (None, {}, KILLED),                               # no status at all
    (0, {"timed_out": True}, TIMEOUT_RETURNCODE),
    (-9, {"timed_out": True, "interrupted": True}, TIMEOUT_RETURNCODE),
    (0, {"failed": True, "timed_out": True}, RUNTIME_FAILURE),
    (137, {"interrupted": True}, KILLED),             # we killed it: no report
    (0, {"interrupted": True, "init_status": "exit 0"}, KILLED),  # it did not finish
    (130, {"interrupted": True, "init_status": "signal 2"}, -2),  # it died of the SIGINT
    (1, {"interrupted": True, "init_status": "exit 1"}, 1),
])
def test_the_rule(raw, kwargs, expected):
    assert returncode_of(raw, **kwargs) == expected
