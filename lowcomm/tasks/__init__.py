"""Built-in training tasks, and loading a user's own with ``module:function``."""

from lowcomm.tasks.base import Batch, Task, TaskError, load_task

__all__ = ["Batch", "Task", "TaskError", "load_task"]
