"""grow: turn one trained checkpoint into a larger or smaller one that starts from what it knows."""

__version__ = "0.1.0"

from .api import expand, inspect, run, shrink, upcycle, verify  # noqa: E402
from .errors import GrowError, UsageError, VerificationFailed  # noqa: E402

__all__ = ["expand", "inspect", "run", "shrink", "upcycle", "verify", "GrowError", "UsageError", "VerificationFailed", "__version__"]
