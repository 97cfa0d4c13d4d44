"""Run shell commands from Jupyter inside a gVisor sandbox, and say honestly when you can't.

The runner core (this package minus ``magics``/``widget``) does not import IPython.
"""

import logging

from .detect import EnvironmentInfo, HostFacts
from .errors import (
    CommandInterrupted,
    GvisorMagicError,
    InvalidRequestError,
    IsolationUnavailable,
    SandboxStartError,
)
from .request import Limits
from .result import CommandResult
from .runner import detect_environment, is_gvisor_available, run_command_isolated

__version__ = "0.1.0"

# A library does not print: results carry every decision, and applications
# (or `kubectl logs`) see the "gvisor" log lines once they configure logging.
logging.getLogger("gvisor_magic").addHandler(logging.NullHandler())

__all__ = [
    "CommandInterrupted",
    "CommandResult",
    "EnvironmentInfo",
    "GvisorMagicError",
    "HostFacts",
    "InvalidRequestError",
    "IsolationUnavailable",
    "Limits",
    "SandboxStartError",
    "__version__",
    "detect_environment",
    "is_gvisor_available",
    "run_command_isolated",
]
