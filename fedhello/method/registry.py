"""Every method by name: one registration per method, with its one-line summary and, when it has
any, the pydantic model of its options (the config's `method_options` section).

    class MyOptions(StrictModel):
        alpha: float = 0.5
    register_method("my-method", lambda ctx: MyMethod("my-method", ctx), "what it does", options=MyOptions)

The method reads its validated options as `self.ctx.options`. The built-in methods register
themselves in `fedhello/method/layers.py`, `hetlora.py` and `flexlora.py`; they are imported the
first time the registry is asked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from fedhello.method.base import Method, MethodContext
from fedhello.registry import Registry

MethodFactory = Callable[[MethodContext], Method]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    factory: MethodFactory
    summary: str
    options: type[BaseModel] | None = None  # the model `method_options` is validated by
    legacy_section: str | None = None  # the config section that held these options before method_options


METHODS: Registry[MethodEntry] = Registry(
    "method",
    "method",
    # each registers its methods when imported
    builtins=(
        "fedhello.method.layers",
        "fedhello.method.hetlora",
        "fedhello.method.flexlora",
        "fedhello.method.fed_pilot",
        "fedhello.method.flora",
    ),
)
DEFAULT_METHOD = "fedhello"


def register_method(
    name: str,
    factory: MethodFactory,
    summary: str = "",
    *,
    options: type[BaseModel] | None = None,
    legacy_section: str | None = None,
) -> None:
    """Make `method: name` build `factory(ctx)`, with `ctx.options` an instance of `options`
    validated from the config's `method_options`. Names are unique."""
    if name in METHODS.entries() and METHODS.get(name).factory is factory:
        return  # the defining module imported again
    METHODS.register(name, MethodEntry(name, factory, summary, options, legacy_section))


def method_entries() -> dict[str, MethodEntry]:
    return METHODS.entries()


def check_method(name: str) -> None:
    """ValueError listing the choices when `name` is not a registered method."""
    if name not in METHODS:
        raise ValueError(METHODS.unknown(name))


def legacy_sections() -> dict[str, type[BaseModel]]:
    """Config sections that held method options before `method_options` (`fisher`, `hetlora`),
    with the options model each holds."""
    return {e.legacy_section: e.options for e in method_entries().values() if e.legacy_section and e.options}


def parse_method_options(
    name: str, given: Mapping[str, Any], where: str = "method_options"
) -> BaseModel | None:
    """The options of method `name` validated from `given`; ValueError naming the key otherwise."""
    entry = method_entries().get(name)
    if entry is None:
        return None  # the method name itself is reported
    if entry.options is None:
        if given:
            raise ValueError(f"{where}: method '{name}' takes no options")
        return None
    try:
        return entry.options.model_validate(dict(given))
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = (
            "unknown key"
            if first["type"] == "extra_forbidden"
            else first["msg"].removeprefix("Value error, ")
        )
        raise ValueError(f"{where}.{key}: {msg} (an option of method '{name}')") from None


def build_method(name: str, ctx: MethodContext) -> Method:
    return METHODS.get(name).factory(ctx)
