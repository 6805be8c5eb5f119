"""Package names imported from their modules on first use (PEP 562), so that a process that needs one part
(the options in a CLI parser, the protocol stubs in a proxy) does not pay for the rest (torch, onnxruntime)."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_names(package: str, where: dict[str, str]):
    """`__getattr__` and `__dir__` for `package`, whose name N lives in its module `where[N]`."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{where[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(where)

    return __getattr__, __dir__
