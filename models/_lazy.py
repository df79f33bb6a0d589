"""Lazy package attributes (PEP 562), so importing a package does not import torch.

`models.config` and the other torch-free modules must stay cheap for processes that never build a
model (Ray Data's preprocessing tasks, the CLI's config checks); a package `__init__` that imported
its torch modules eagerly would make every `import models.config` pay for torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> imported from `sources[name]` on first use,
    then cached in the package's namespace."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
