"""Each personalized-FL method as a small registered class whose hooks the one round loop calls.

`registry` holds the methods by name (`register_method`, `METHODS`) and turns a run's
`method_options` into the method's frozen `Options`; `base` is FedAvg behaviour and the helpers
methods share; one file per method or family holds the built-in methods, with the paper's settings
as defaults. Where the paper and the public FedPerfix code differ, the classes follow the code and
their docstrings say so. Adding a method is one new file here (every module of the package is imported) with a
`@register_method` class, or the same class in your own code, registered when it is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from fedsens.personalize.aggregation import weighted_mean
from fedsens.personalize.methods.apfl import APFL, alpha_step
from fedsens.personalize.methods.base import Method, NoOptions, only_trainable, train_steps
from fedsens.personalize.methods.fedperfix import FedPerfix, VanillaPrefix
from fedsens.personalize.methods.fixed import FedAvg, FedBN, FedPer, Local, VanillaAttention
from fedsens.personalize.methods.head import FedBABU, FedRep
from fedsens.personalize.methods.perfedavg import PerFedAvg
from fedsens.personalize.methods.registry import (
    METHODS,
    method_class,
    names,
    paper_labels,
    paper_methods,
    register_method,
    resolve_options,
)

if TYPE_CHECKING:
    from fedsens.personalize.config import RunConfig

# Every module of this package registers its methods on import, so a new method is one new file here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "APFL",
    "METHODS",
    "FedAvg",
    "FedBABU",
    "FedBN",
    "FedPer",
    "FedPerfix",
    "FedRep",
    "Local",
    "Method",
    "NoOptions",
    "PerFedAvg",
    "VanillaAttention",
    "VanillaPrefix",
    "alpha_step",
    "get_method",
    "method_class",
    "names",
    "only_trainable",
    "paper_labels",
    "paper_methods",
    "register_method",
    "resolve_options",
    "train_steps",
    "weighted_mean",
]


def get_method(config: RunConfig) -> Method:
    """The method object for a run (RunConfig has checked its name, options and parts already)."""
    return method_class(config.method)(config)
