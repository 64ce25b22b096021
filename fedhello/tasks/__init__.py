"""Tasks: what is learned and measured. One module per task, registered by name.

    from fedhello.tasks import Task, register_task
    @register_task
    class MyTask(Task): name = "my-task"; ...

`task: my-task` in a config then selects it (see docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhello.errors import UserError
from fedhello.tasks.base import Examples, Task, batches

if TYPE_CHECKING:
    from fedhello.config import ExperimentConfig

__all__ = ["Examples", "Task", "batches", "build_task", "register_task", "task_class", "task_names"]

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Make a task selectable by its `name` (usable as a class decorator)."""
    _TASKS[cls.name] = cls
    return cls


def _builtins() -> None:
    if "text-classification" not in _TASKS:
        from fedhello.tasks.causal_lm import CausalLM
        from fedhello.tasks.image_classification import ImageClassification
        from fedhello.tasks.text_classification import TextClassification

        register_task(TextClassification)
        register_task(ImageClassification)
        register_task(CausalLM)


def task_names() -> list[str]:
    _builtins()
    return list(_TASKS)


def task_class(name: str) -> type[Task]:
    """The registered task class of this name; UserError naming the choices otherwise."""
    _builtins()
    if name not in _TASKS:
        raise UserError(f"task: unknown task '{name}' (choose from {', '.join(_TASKS)})")
    return _TASKS[name]


def build_task(cfg: ExperimentConfig) -> Task:
    return task_class(cfg.task)(cfg)
