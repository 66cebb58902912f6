"""grow: turn one trained checkpoint into a larger or smaller one that starts from what it knows.

The API functions are bound on first use, so that `import grow.cli` (and with it `grow --help`) does
not load torch; the first of them loads the modules that make tensors."""

import os as _os
import sys
import types

__version__ = "0.1.0"
DEFAULT_TOL = 1e-4  # the largest relative error grow verify accepts from an exact method

API = ("expand", "inspect", "run", "shrink", "upcycle", "verify")

# Fresh tensors in 2 MB pages: building a model's worth of output tensors otherwise spends most of its
# system time faulting in 4 kB pages. Read by torch once, so it only works when set before torch is.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .errors import GrowError, UsageError, VerificationFailed  # noqa: E402


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Loading the submodule grow.verify binds its name on the package; the name stays the function."""

    def __setattr__(self, name, value):
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [*API, "GrowError", "UsageError", "VerificationFailed", "DEFAULT_TOL", "__version__"]
