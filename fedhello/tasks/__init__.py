"""Tasks: what is learned and measured. One module per task, registered by name.

    from fedhello.tasks import Task, register_task
    @register_task
    class MyTask(Task): name = "my-task"; ...

`task: my-task` in a config then selects it (see docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhello.registry import Registry
from fedhello.tasks.base import Examples, Task, batches

if TYPE_CHECKING:
    from fedhello.config import ExperimentConfig

__all__ = ["TASKS", "Examples", "Task", "batches", "build_task", "register_task", "task_class", "task_names"]

TASKS: Registry[type[Task]] = Registry(
    "task",
    "task",
    builtins=(
        "fedhello.tasks.text_classification",
        "fedhello.tasks.image_classification",
        "fedhello.tasks.causal_lm",
    ),
)


def register_task(cls: type[Task]) -> type[Task]:
    """Make a task selectable by its `name` (usable as a class decorator); names are unique."""
    return TASKS.register(cls.name, cls)


def task_names() -> list[str]:
    return TASKS.names()


def task_class(name: str) -> type[Task]:
    """The registered task class of this name; UserError naming the choices otherwise."""
    return TASKS.get(name)


def build_task(cfg: ExperimentConfig) -> Task:
    return task_class(cfg.task)(cfg)
