"""Every method by name: one registration per method, with its one-line summary.

    register_method("my-method", lambda ctx: MyMethod("my-method", ctx), "what it does")

The built-in methods register themselves in `fedhello/method/layers.py`, `hetlora.py` and
`flexlora.py`; they are imported the first time the registry is asked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from fedhello.errors import UserError
from fedhello.method.base import Method, MethodContext

MethodFactory = Callable[[MethodContext], Method]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    factory: MethodFactory
    summary: str


_METHODS: dict[str, MethodEntry] = {}
DEFAULT_METHOD = "fedhello"


def register_method(name: str, factory: MethodFactory, summary: str = "") -> None:
    """Make `method: name` build `factory(ctx)`. Names are unique."""
    if name in _METHODS and _METHODS[name].factory is not factory:
        raise ValueError(f"method '{name}' is already registered")
    _METHODS[name] = MethodEntry(name, factory, summary)


def _builtins() -> None:
    for module in ("layers", "hetlora", "flexlora"):  # each registers its methods when imported
        importlib.import_module(f"fedhello.method.{module}")


def method_entries() -> dict[str, MethodEntry]:
    _builtins()
    return dict(_METHODS)


def check_method(name: str) -> None:
    """ValueError listing the choices when `name` is not a registered method."""
    entries = method_entries()
    if name not in entries:
        raise ValueError(f"unknown method '{name}' (choose from {', '.join(entries)})")


def build_method(name: str, ctx: MethodContext) -> Method:
    try:
        check_method(name)
    except ValueError as e:
        raise UserError(f"method: {e}") from None
    return _METHODS[name].factory(ctx)
