"""fedsens: where and how to personalize Vision Transformers in federated learning.

The public API, for use from Python (see docs/api.md, "The Python API"):

    import fedsens
    result = fedsens.run(fedsens.RunConfig(rounds=3, out="runs/x"))

Each name is imported on first use, so `import fedsens` (and `fedsens --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "RunConfig": "fedsens.personalize.config",
    "run": "fedsens.personalize.federation",
    "SweepConfig": "fedsens.sensitivity.sweep",
    "run_sweep": "fedsens.sensitivity.sweep",
    "CompareConfig": "fedsens.sensitivity.compare",
    "run_compare": "fedsens.sensitivity.compare",
    "build_report": "fedsens.reports.report",
    "UserError": "fedsens.personalize.errors",
}

__all__ = [
    "CompareConfig",
    "RunConfig",
    "SweepConfig",
    "UserError",
    "__version__",
    "build_report",
    "run",
    "run_compare",
    "run_sweep",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from fedsens.personalize.config import RunConfig
    from fedsens.personalize.errors import UserError
    from fedsens.personalize.federation import run
    from fedsens.reports.report import build_report
    from fedsens.sensitivity.compare import CompareConfig, run_compare
    from fedsens.sensitivity.sweep import SweepConfig, run_sweep


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedsens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
