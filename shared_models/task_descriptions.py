"""What each imaging task is, without torch: the one list of tasks medfed federates.

The run config (shared_models/config.py) checks a task's model, classes and
sizes on every command line and in every message, long before anything
trains, and must not import torch to do so. Each description names the class
that implements the task (shared_models/tasks/): the registry of
implementations is built from this list, so a task exists in both or in
neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.shared_models.protocol import Metric

# The image classifiers and regressors: medfed's small CNN and MONAI's networks.
BACKBONES = ("smallcnn", "densenet121", "resnet18", "resnet34", "resnet50", "efficientnet-b0")


@dataclass(frozen=True)
class TaskDescription:
    """One imaging task as the run config knows it: names, defaults and label kind."""

    name: str
    implementation: str  # "module:Class" under medfed.shared_models.tasks
    models: tuple[str, ...]  # the first is the default
    default_classes: tuple[str, ...]
    headline_metric: str  # shown in progress lines and reports
    label_kind: str  # "mask" (a file), "class" (an int), "value" (a float) or "bundle"
    spatial_dims: int
    default_modality: str  # DICOM modality code assumed when a site declares none
    default_in_channels: int = 1
    default_width: int = 16  # base channels of the CPU-sized networks
    default_image_size: int = 64  # pixels (voxels) per side fed to the network


DESCRIPTIONS: dict[str, TaskDescription] = {
    task.name: task
    for task in (
        TaskDescription(
            name="segmentation", implementation="segmentation:SegmentationTask",
            models=("unet",), default_classes=("background", "edema", "tumour"),
            headline_metric="dice", label_kind="mask", spatial_dims=2, default_modality="MR",
        ),
        TaskDescription(
            name="segmentation3d", implementation="segmentation3d:Segmentation3DTask",
            models=("unet", "segresnet"),
            default_classes=("background", "necrotic-core", "edema", "enhancing"),
            headline_metric="dice", label_kind="mask", spatial_dims=3, default_modality="MR",
            default_in_channels=4,  # T1, T1ce, T2, FLAIR
            default_width=8,  # volumes cost the cube of their size; keeps a CPU round in seconds
            default_image_size=32,
        ),
        TaskDescription(
            name="classification", implementation="classification:ClassificationTask",
            models=BACKBONES, default_classes=("normal", "pneumonia", "covid"),
            headline_metric="auc", label_kind="class", spatial_dims=2, default_modality="CR",
        ),
        TaskDescription(
            name="regression", implementation="regression:RegressionTask", models=BACKBONES,
            default_classes=("bone-age-months",),  # the name of the regressed value
            headline_metric="mae", label_kind="value", spatial_dims=2, default_modality="DX",
        ),
        TaskDescription(
            name="gan", implementation="gan:GANTask", models=("dcgan",),
            default_classes=("normal", "pneumonia", "covid"), headline_metric="tstr-accuracy",
            label_kind="class", spatial_dims=2, default_modality="CR",
        ),
        TaskDescription(
            # A MONAI bundle's network, transforms and labels are its own: medfed's model
            # settings do not apply and it reads no images (modality OT, DICOM's "other");
            # spatial_dims 2 only sizes the range checks of medfed's unused image settings.
            name="bundle", implementation="bundle_task:BundleTask", models=("network_def",),
            default_classes=(), headline_metric=Metric.KEY_METRIC, label_kind="bundle",
            spatial_dims=2, default_modality="OT",
        ),
    )
}  # fmt: skip
TASK_NAMES = tuple(DESCRIPTIONS)
# The tasks whose site images medfed itself reads (a bundle's own transforms read its data).
SITE_DATA_TASKS = tuple(name for name, task in DESCRIPTIONS.items() if task.label_kind != "bundle")
