"""Package attributes that import their module on first use (PEP 562), so that importing a package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(module_globals: dict[str, Any], names: dict[str, str]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for a package whose `names` (attribute -> module that defines it) load on first
    use; assign them in the package: `__getattr__, __dir__ = lazy_attributes(globals(), {...})`."""
    package = module_globals["__name__"]

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            module_globals[name] = value  # later lookups skip __getattr__
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(module_globals) | set(names))

    return __getattr__, __dir__
