"""One registration style for everything selectable by name in a config: tasks, methods, engines
and data sources. A `Registry` maps names to entries; registering a taken name is an error
(two plug-ins cannot silently replace each other), and asking for an unknown one names the
config field and the choices.

    TASKS = Registry[type[Task]]("task", "task")
    TASKS.register("my-task", MyTask)
    TASKS.get("my-task")            # UserError "task: unknown task 'x' (choose from ...)" otherwise

Built-in entries are registered by importing the modules that define them the first time a
registry is asked (`builtins`), so importing a registry stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Generic, TypeVar

from fedhello.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to entries of one kind, with a duplicate guard and one-line errors."""

    def __init__(self, kind: str, field: str, builtins: Iterable[str] = ()) -> None:
        self.kind = kind  # what an entry is, in messages: "task", "engine", ...
        self.field = field  # the config field that selects an entry
        self._builtin_modules = tuple(builtins)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        """Make `name` select `entry`. Registering the same entry again is harmless (a module
        imported twice); a different entry under a taken name is a ValueError."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtin_modules:  # each registers its entries when imported
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load_builtins()
        return list(self._entries)

    def entries(self) -> dict[str, T]:
        self._load_builtins()
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def unknown(self, name: str) -> str:
        """The message for an unknown name, without the field: "unknown task 'x' (choose from ...)"."""
        return f"unknown {self.kind} '{name}' (choose from {', '.join(self.names())})"

    def get(self, name: str) -> T:
        """The entry of `name`; a one-line UserError naming the field and the choices otherwise."""
        self._load_builtins()
        if name not in self._entries:
            raise UserError(f"{self.field}: {self.unknown(name)}")
        return self._entries[name]
