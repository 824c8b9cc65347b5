"""Datasets and tasks without Lightning: where each dataset's files are read from, how its images
are normalised, and the tasks (dataset + preprocessing + input shape + classes) the zoo's models
are trained and measured on. The Lightning DataModules (:mod:`mdeq.lightning.data`) and the
evaluation (:mod:`mdeq.evaluation`) both build on this."""

from mdeq.data.normalized import NormalizedTensorDataset
from mdeq.data.sources import DatasetNotFoundError, default_cache_dir, default_data_root
from mdeq.data.tasks import Task, UnknownTaskError, get_task, list_tasks, register_task

__all__ = [
    "DatasetNotFoundError",
    "NormalizedTensorDataset",
    "Task",
    "UnknownTaskError",
    "default_cache_dir",
    "default_data_root",
    "get_task",
    "list_tasks",
    "register_task",
]
