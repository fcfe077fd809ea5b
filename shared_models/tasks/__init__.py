"""Registry of the imaging tasks medfed federates, by run-config name."""

from medfed.shared_models.tasks.base import Task
from medfed.shared_models.tasks.bundle import BundleTask
from medfed.shared_models.tasks.classification import ClassificationTask
from medfed.shared_models.tasks.gan import GANTask
from medfed.shared_models.tasks.regression import RegressionTask
from medfed.shared_models.tasks.segmentation import SegmentationTask
from medfed.shared_models.tasks.segmentation3d import Segmentation3DTask

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        SegmentationTask(),
        Segmentation3DTask(),
        ClassificationTask(),
        RegressionTask(),
        GANTask(),
        BundleTask(),
    )
}

__all__ = ["TASKS", "Task"]
