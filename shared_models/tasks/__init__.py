"""Registry of the imaging tasks medfed federates, by run-config name.

Built from the one list of tasks (shared_models/task_descriptions.py): each
description names the class that implements it, one instance per task.
"""

from importlib import import_module

from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Task


def _implementation(path: str) -> Task:
    module, _, name = path.partition(":")
    return getattr(import_module(f"{__name__}.{module}"), name)()


TASKS: dict[str, Task] = {
    name: _implementation(task.implementation) for name, task in DESCRIPTIONS.items()
}

__all__ = ["TASKS", "Task"]
