"""Kept for existing callers: the datasets live in `fedsens.personalize.datasets` (one module each).

`from fedsens.personalize import data; data.load("digits")` and `data.ImageSet` work as before.
"""

from __future__ import annotations

from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.datasets.registry import dataset_defaults, load, load_for_run, names

__all__ = ["ImageSet", "dataset_defaults", "load", "load_for_run", "names"]
