"""A run's model as a MONAI bundle: what `python -m monai.bundle run` runs with no medfed.

The network (`network_def`) and the preprocessing are written from the same
config items medfed builds them from (`Task.network_spec`,
`preprocessing_spec`), so the bundle sees a study exactly as `medfed predict`
does. The two transforms that are medfed's own (ConformSpatiald, SaveNiftiMaskd)
travel as source in scripts/, the bundle convention for custom code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import platform
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn

from medfed.client.data import transforms
from medfed.client.data.transforms import CONFORM, preprocessing_spec
from medfed.client.predict.inputs import IMAGE_SUFFIXES
from medfed.client.predict.writers import SaveNiftiMaskd
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import GLOBAL_MODEL, read_metrics
from medfed.shared_models.tasks import TASKS

BUNDLE_CONFORM = "scripts.medfed_transforms.ConformSpatiald"
BUNDLE_SAVE = "scripts.medfed_transforms.SaveNiftiMaskd"
SCRIPT_HEADER = '''"""medfed's own transforms, copied by `medfed export` (no medfed needed)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform


'''


@dataclass(frozen=True)
class Origin:
    """Where an exported model comes from: the run, and under FedBN either the caveat of
    its global model or the hospital's own layers that made it that hospital's model."""

    run_dir: Path
    caveat: str | None = None
    site_layers: Path | None = None


def write_bundle(origin: Origin, cfg: RunConfig, net: nn.Module, modality: str, out: Path) -> Path:
    """out/ as a MONAI bundle: configs/{metadata,inference}.json, models/model.pt, scripts/.
    models/model.pt is the run's global_model.pt byte for byte, or with a hospital's
    layers (`origin.site_layers`) that hospital's whole model."""
    TASKS[cfg.task].network_spec(cfg)  # a task without a describable network (gan) is refused
    for folder in ("configs", "models", "scripts", "docs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    if origin.site_layers is None:
        shutil.copyfile(origin.run_dir / GLOBAL_MODEL, out / "models" / "model.pt")
    else:
        torch.save(net.state_dict(), out / "models" / "model.pt")
    (out / "scripts" / "__init__.py").write_text("")
    sources = [inspect.getsource(c) for c in (transforms.ConformSpatiald, SaveNiftiMaskd)]
    (out / "scripts" / "medfed_transforms.py").write_text(SCRIPT_HEADER + "\n\n".join(sources))
    config = inference_config(cfg, modality)
    (out / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    metadata = bundle_metadata(origin, cfg, net, modality)
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "docs" / "README.md").write_text(readme(cfg, origin))
    return out


def write_federated_bundle(
    origin: Origin, cfg: RunConfig, net: nn.Module, source: Path, out: Path
) -> Path:
    """A task = bundle run: the bundle it federated (`source`, a folder checked for this
    site, never the path in model.json), with the federated weights as models/model.pt
    and the run's provenance in configs/metadata.json (key `medfed`).

    Everything else is the bundle's own (its inference config, if it has one, runs
    the federated model as it ran the original)."""
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "models").mkdir(exist_ok=True)
    shutil.copyfile(origin.run_dir / GLOBAL_MODEL, out / "models" / "model.pt")
    path = out / "configs" / "metadata.json"
    metadata = json.loads(path.read_text()) if path.is_file() else {}
    metadata["medfed"] = provenance(origin, cfg, net)
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def inference_config(cfg: RunConfig, modality: str) -> dict[str, Any]:
    """configs/inference.json: every image or DICOM series folder in `dataset_dir` through
    the network, results in `output_dir` (masks as NIfTI, or predictions.csv)."""
    task = TASKS[cfg.task]
    steps = preprocessing_spec(cfg, modality, ["image"])
    for step in steps:
        if step["_target_"] == CONFORM:
            step["_target_"] = BUNDLE_CONFORM
    config: dict[str, Any] = {
        "imports": ["$import os", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        # what MONAI's evaluator would stop at: hidden files, and files of other kinds
        # (a README beside the images); DICOM files without a suffix and series folders stay
        "image_suffixes": f"${tuple(IMAGE_SUFFIXES)!r}",
        "datalist": "$[{'image': os.path.join(@dataset_dir, n)} for n in "
        "sorted(os.listdir(@dataset_dir)) if not n.startswith('.') and ('.' not in n or "
        "n.lower().endswith(@image_suffixes) or os.path.isdir(os.path.join(@dataset_dir, n)))]",
        "network_def": task.network_spec(cfg),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "checkpoint": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + "
                       "'/models/model.pt'", "load_dict": {"model": "@network"},
                       "map_location": "@device"},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }  # fmt: skip
    config.update(_segmentation(cfg) if task.label_kind == "mask" else _image_level(task))
    return config


def _segmentation(cfg: RunConfig) -> dict[str, Any]:
    """Sliding-window inference, probabilities inverted to the input's geometry, then the
    argmax mask saved as NIfTI (what `medfed predict` does)."""
    roi = [cfg.patch_size or cfg.image_size] * TASKS[cfg.task].spatial_dims
    return {
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": BUNDLE_SAVE, "keys": "pred", "output_dir": "@output_dir",
             "postfix": "_seg"},
        ]},
        "handlers": ["@checkpoint"],
    }  # fmt: skip


def _image_level(task: Any) -> dict[str, Any]:
    """Class probabilities (or the regressed value), one CSV row per image."""
    steps = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    return {
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose",
                           "transforms": steps if task.label_kind == "class" else []},
        "handlers": ["@checkpoint", {
            "_target_": "ClassificationSaver", "output_dir": "@output_dir",
            "filename": "predictions.csv",
            "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
            "output_transform": "$lambda output: [item['pred'] for item in output]",
        }],
    }  # fmt: skip


def bundle_metadata(
    origin: Origin, cfg: RunConfig, net: nn.Module, modality: str
) -> dict[str, Any]:
    """configs/metadata.json: MONAI's bundle metadata, and the federated run it came from."""
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported from a medfed federated run"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": version("nibabel"), "pydicom": version("pydicom")},
        "name": f"medfed {cfg.task} ({cfg.model})",
        "task": cfg.task,
        "description": f"{cfg.task} by a {cfg.model} trained with federated learning (medfed)",
        "authors": "the hospitals of the federation (see medfed.sites)",
        "copyright": "the federation's members",
        "network_data_format": data_format(cfg, modality),
        "medfed": provenance(origin, cfg, net),
    }


def data_format(cfg: RunConfig, modality: str) -> dict[str, Any]:
    """The network's input and output, as MONAI's metadata schema describes them."""
    task = TASKS[cfg.task]
    size = [cfg.image_size] * task.spatial_dims
    outputs = 1 if task.label_kind == "value" else len(cfg.classes)
    image = {
        "type": "image", "format": "magnitude", "modality": modality,
        "num_channels": cfg.in_channels, "spatial_shape": size, "dtype": "float32",
        "value_range": [0, 1], "is_patch_data": bool(cfg.patch_size),
        "channel_def": {str(i): f"channel {i}" for i in range(cfg.in_channels)},
    }  # fmt: skip
    formats = {"mask": "segmentation", "class": "classes", "value": "regression"}
    pred = {
        "type": "image" if task.label_kind == "mask" else "probabilities",
        "format": formats[task.label_kind], "num_channels": outputs,
        "spatial_shape": size if task.label_kind == "mask" else [outputs], "dtype": "float32",
        "value_range": [0, 1], "is_patch_data": bool(cfg.patch_size),
        "channel_def": {str(i): name for i, name in enumerate(cfg.classes)},
    }  # fmt: skip
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def provenance(origin: Origin, cfg: RunConfig, net: nn.Module) -> dict[str, Any]:
    """Where the weights come from: the run, its settings, its sites and final metrics."""
    run_dir = origin.run_dir
    metrics = read_metrics(run_dir) or {}
    rounds = metrics.get("rounds") or [{}]
    digest = _sha256(run_dir / GLOBAL_MODEL)
    layers = origin.site_layers
    return {
        **({"warning": origin.caveat} if origin.caveat else {}),
        **({"site-layers": {"file": layers.name, "sha256": _sha256(layers)}} if layers else {}),
        "run": run_dir.resolve().name,
        "model-sha256": digest,
        "parameters": sum(p.numel() for p in net.parameters()),
        "status": metrics.get("status"),
        "rounds": rounds[-1].get("round"),
        "strategy": cfg.strategy,
        "sites": sorted(rounds[-1].get("sites", {})),
        "final-metrics": rounds[-1].get("global", {}),
        "config": cfg.to_mapping(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exported-by": f"medfed {version('medfed')} (Python {platform.python_version()})",
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def readme(cfg: RunConfig, origin: Origin) -> str:
    return (
        f"# medfed {cfg.task} ({cfg.model})\n\nExported from the federated run "
        f"`{origin.run_dir.resolve().name}` (see configs/metadata.json, key `medfed`).\n\n"
        + (f"**Warning**: {origin.caveat}.\n\n" if origin.caveat else "")
        + "Run it on a folder of images (NIfTI, DICOM files or series folders, PNG/JPEG), "
        "with MONAI installed and no medfed:\n\n"
        "    python -m monai.bundle run --config_file configs/inference.json "
        "--dataset_dir IMAGES --output_dir OUT\n"
    )
