"""Built-in training tasks (`BUILTIN`: tinylm, codeclass, terrain), and loading a
user's own with ``module:function``."""

from lowcomm.tasks.base import BUILTIN, SHARDS, Batch, Task, TaskError, check_shards, example_task, load_task

__all__ = ["BUILTIN", "SHARDS", "Batch", "Task", "TaskError", "check_shards", "example_task", "load_task"]
