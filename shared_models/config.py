"""The one run-config schema shared by the ServerApp, the ClientApp and the CLI.

Flower hands both apps the same flat `run_config` (pyproject defaults merged
with `flwr run --run-config` overrides). Validating it in one place means a
bad value fails the same way in simulation and deployment, with an error
naming the key, instead of deep inside a training step on one hospital.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medfed.shared_models.protocol import SECAGG_MAX_PARTICIPANTS
from medfed.shared_models.secagg.quantize import MAX_BITS, MIN_BITS, Encoding
from medfed.shared_models.task_descriptions import DESCRIPTIONS, TASK_NAMES

# The strategies by run-config name, each with the flwr.serverapp.strategy class that
# runs it (server/run/strategies.py builds it from this name: the one list of strategies).
# FedBN (Li et al., 2021) is FedAvg at the coordinator: the normalisation layers are never
# sent (shared_models.weights, local_norms), so what it averages is the rest.
FLOWER_STRATEGY_CLASSES = {
    "fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad", "fedavgm": "FedAvgM", "fedbn": "FedAvg",
    "fedmedian": "FedMedian", "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum",
}  # fmt: skip
STRATEGIES = tuple(FLOWER_STRATEGY_CLASSES)
# Robust strategies look at every update one by one: no secure aggregation.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
# Weighted-mean strategies (FedOpt variants and FedAvgM average first, then step; FedBN
# averages all but the normalisation layers, which stay at each hospital).
MEAN_STRATEGIES = tuple(s for s in STRATEGIES if s not in ROBUST_STRATEGIES)
# Strategies that take a step of their own after the mean (Flower's eta; FedAvgM's rate).
SERVER_STEP_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")
DP_MODES = ("off", "client", "server")
# Where the DP noise is added: by the coordinator to the mean (Flower's central DP), or by
# each hospital inside its masked update; auto: the hospitals wherever they can.
DP_NOISE = ("auto", "coordinator", "hospitals")
# Cross-site evaluation at the end of a run: the global model at every site (the final
# round's evaluation, no extra message), and with "all" each site's last local model too.
CROSS_SITE_MODES = ("off", "global", "all")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
INTENSITIES = ("auto", "ct-window", "percentile", "scale", "zscore", "none")
FITS = ("resize", "pad-crop")
FREEZES = ("none", "backbone")
# Normalisation of the CPU-sized networks (MONAI's defaults are instance norm without
# affine terms: nothing to keep local, so FedBN needs "batch"). The other networks
# come with their own (BatchNorm; GroupNorm in SegResNet).
NORMS = ("instance", "batch")
NORM_CONFIGURABLE = ("smallcnn", "unet")
# The most a site may be asked to decode for one image (a 2048x2048x1024 float volume is 16 GiB).
MAX_IMAGE_MEGABYTES = 16384
# Pixels per side of the network's input, by spatial rank: a 2048² slice or a 512³ volume
# is already more than a hospital GPU holds in a batch.
MAX_IMAGE_SIZE = {2: 2048, 3: 512}
WEEK_SECONDS = 7 * 24 * 3600.0
# Inclusive ranges of the integer settings. Past them a value is a typo or an attempt to
# exhaust a node's memory or time, never a setting; the checks below add the rules
# that tie settings together.
INT_RANGES = {
    "num_server_rounds": (1, 100_000),
    "local_epochs": (1, 10_000),
    "batch_size": (1, 4096),
    "in_channels": (1, 64),
    "model_width": (1, 1024),
    "model_depth": (1, 6),
    "latent_size": (1, 4096),
    "min_nodes": (1, SECAGG_MAX_PARTICIPANTS),
    "stats_min_count": (1, 1_000_000),
    "secagg_neighbours": (0, SECAGG_MAX_PARTICIPANTS),
    "secagg_threshold": (0, SECAGG_MAX_PARTICIPANTS),
    "secagg_quantization_bits": (MIN_BITS, MAX_BITS),
    "seed": (0, 2**32 - 1),  # NumPy's seed range
    "max_image_megabytes": (1, MAX_IMAGE_MEGABYTES),
    "krum_byzantine": (0, SECAGG_MAX_PARTICIPANTS),
}
# Ranges of the float settings: (low, high, whether low itself is allowed). Every float
# must also be finite.
FLOAT_RANGES = {
    "lr": (0.0, 10.0, False),
    "proximal_mu": (0.0, 1000.0, True),
    "server_lr": (0.0, 10.0, True),
    "secagg_clipping_range": (0.0, 1e6, False),
    "secagg_max_weight": (1.0, 2.0**24, True),
    "dp_noise_multiplier": (0.0, 1000.0, True),
    "dp_clipping_norm": (0.0, 1e6, False),
    "fraction_train": (0.0, 1.0, False),
    "gan_augment_ratio": (0.0, 100.0, True),
    "target_scale": (0.0, 1e9, False),
    "node_wait_seconds": (0.0, WEEK_SECONDS, False),
    "round_timeout_seconds": (0.0, WEEK_SECONDS, False),
    "update_norm_factor": (0.0, 1e6, True),
}
MAX_CLASSES = 1000
MAX_SPACING_MM = 100.0
MODALITY = re.compile(r"[A-Za-z0-9]{1,16}")  # DICOM's (0008,0060) is at most 16 characters


class ConfigError(ValueError):
    """A user-facing configuration error: the message names the key and value."""


@dataclass(frozen=True)
class RunConfig:
    """Resolved, validated run settings (keys mirror `[tool.flwr.app.config]`)."""

    task: str = "segmentation"
    model: str = ""  # empty: the task's default network
    bundle: str = ""  # task = bundle: a MONAI bundle folder (configs/train.json) at every node
    num_server_rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.003
    batch_size: int = 8
    image_size: int = 0  # 0: the task's default (64; 32 for volumes)
    in_channels: int = 0  # 0: the task's default (1; 4 MRI channels for segmentation3d)
    patch_size: int = 0  # segmentation: train on random patches (2D evaluates whole images)
    class_names: str = ""  # comma-separated; empty: the task's default classes
    model_width: int = 0  # 0: the task's default (16; 8 for volumes)
    model_depth: int = 3
    norm: str = "instance"  # smallcnn and unet: instance | batch (FedBN needs batch)
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.0  # fedadam/fedyogi/fedadagrad/fedavgm step; 0: Flower's default
    krum_byzantine: int = 0  # krum: hospitals that may send arbitrary updates (Krum's f)
    update_norm_factor: float = 10.0  # reject updates this many times the median change; 0: off
    secure_aggregation: bool = False  # SecAgg+ masks: the coordinator sees only the sum
    secagg_neighbours: int = 0  # SecAgg+ neighbourhood size; 0: every other hospital
    secagg_threshold: int = 0  # shares needed to unmask; 0: a strict majority of a group
    secagg_clipping_range: float = 16.0  # update values are clipped to +-this before encoding
    secagg_quantization_bits: int = 30  # fixed-point resolution of the encoded update
    secagg_max_weight: float = 1000.0  # examples at which a hospital's own weight is full
    dp_mode: str = "off"  # off | client (clip at the site) | server (clip at the coordinator)
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0  # L2 norm bound of one hospital's update
    dp_adaptive: bool = False  # adapt the clipping norm to the updates' median norm
    dp_delta: float = 1e-5  # the delta at which epsilon is reported
    dp_noise: str = "auto"  # auto | coordinator | hospitals (each adds its share, masked)
    fraction_train: float = 1.0
    pretrained_weights: str = ""  # a local checkpoint that initialises the global model
    freeze: str = "none"  # none | backbone (train the head only)
    latent_size: int = 64  # gan: length of the generator's latent code
    gan_feature_model: str = ""  # gan: classification run whose features FID uses
    gan_model: str = ""  # classification: a gan run folder that augments scarce classes
    gan_augment_ratio: float = 0.0  # classification: generated images per real one
    target_scale: float = 100.0  # regression: targets are divided by this inside the loss
    min_nodes: int = 2
    node_wait_seconds: float = 120.0
    round_timeout_seconds: float = 600.0
    val_fraction: float = 0.2
    federated_stats: bool = True  # ask every site for its summary (small counts hidden) first
    # false: each hospital validates the global model it receives before training on it, in
    # the same message (the last model gets a message of its own); true: a message per round
    separate_evaluation: bool = False
    stats_min_count: int = 10
    seed: int = 0
    modality: str = "auto"  # auto: from dataset.json, else the task's usual modality
    intensity: str = "auto"  # auto: by modality (CT window, MR percentiles, else scaling)
    ct_window: str = "-1000,1000"
    spacing: str = ""  # e.g. "1.0,1.0": resample to this pixel spacing (mm)
    fit: str = "resize"  # resize | pad-crop
    max_image_megabytes: int = 1024  # an image whose header declares more is skipped unread
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    data_root: str = ""
    out_dir: str = "runs/latest"
    resume_from: str = ""  # a run folder (or run id on a coordinator) to carry on
    cross_site: str = "global"  # off | global | all (each site's last local model too)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], validate: bool = True) -> RunConfig:
        """Build from Flower-style kebab-case keys; unknown keys are errors.

        `validate=False` skips the checks of values against the task and each
        other: the hospital's SecAgg+ steps read their settings that way and
        check what they use themselves.
        """
        known = {config_key(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = (
                    f"did you mean '{close[0]}'?"
                    if close
                    else f"known keys: {', '.join(sorted(known))}"
                )
                raise ConfigError(f"unknown config key '{key}' ({hint})")
            field = known[key]
            kwargs[field.name] = _coerce(key, value, _field_type(field.type))
        config = cls(**kwargs)
        if validate:
            config.validate()
        return config

    def validates_in_training(self, server_round: int) -> bool:
        """Whether round `server_round`'s training message also has each hospital validate
        the model it carries (round r-1's), before training on it. Not in round 1 (round 0
        evaluated the initial model on its own, and names the sites) nor when only some
        hospitals train (every site validates every model); the last model is evaluated in
        a message of its own."""
        return not self.separate_evaluation and self.fraction_train >= 1.0 and server_round > 1

    def secagg_encoding(self) -> Encoding:
        """How this run encodes updates under secure aggregation (alike at every site)."""
        return Encoding(
            clipping_range=self.secagg_clipping_range,
            bits=self.secagg_quantization_bits,
            max_weight=self.secagg_max_weight,
            equal_weights=self.dp_mode != "off",
        )

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys, as Flower's run config and metrics.json carry them."""
        return {config_key(k): v for k, v in asdict(self).items()}

    def validate(self) -> None:
        """Check ranges and names; raise ConfigError naming the first bad key."""
        self._resolve_task_defaults()
        self._validate_choices()
        self._validate_ranges()
        self._validate_preprocessing()
        self._validate_sizes()
        self._validate_training()
        self._validate_privacy()
        self._validate_bundle()

    def _resolve_task_defaults(self) -> None:
        """Fill the settings left at 0 or empty with the task's defaults."""
        if self.task not in DESCRIPTIONS:
            _bad("task", self.task, f"one of {', '.join(TASK_NAMES)}")
        task = DESCRIPTIONS[self.task]
        defaults = {
            "model": task.models[0],
            "image_size": task.default_image_size,
            "model_width": task.default_width,
            "in_channels": task.default_in_channels,
            "class_names": ",".join(task.default_classes),
        }
        for name, default in defaults.items():
            if getattr(self, name) in (0, ""):
                object.__setattr__(self, name, default)

    def _validate_choices(self) -> None:
        """Names chosen from a fixed list: model, strategy, device, freeze, precision."""
        task = DESCRIPTIONS[self.task]
        if self.model not in task.models:
            _bad("model", self.model, f"for task '{self.task}' one of {', '.join(task.models)}")
        for attr, allowed in (
            ("strategy", STRATEGIES),
            ("intensity", INTENSITIES),
            ("fit", FITS),
            ("precision", PRECISIONS),
            ("freeze", FREEZES),
            ("norm", NORMS),
            ("cross_site", CROSS_SITE_MODES),
        ):
            if getattr(self, attr) not in allowed:
                _bad(attr, getattr(self, attr), f"one of {', '.join(allowed)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            _bad("device", self.device, "auto, cpu, cuda or cuda:N")
        self._validate_norm()
        if self.freeze == "backbone" and task.label_kind == "mask":
            _bad("freeze", self.freeze, "'none' for segmentation (no separable head)")
        # a bundle brings its own labels: medfed needs no class names for it
        wanted = {"value": 1, "bundle": 0}.get(task.label_kind, 2)
        if len(self.classes) < wanted or len(set(self.classes)) != len(self.classes):
            _bad(
                "class_names",
                self.class_names,
                f"at least {wanted} distinct comma-separated name(s)",
            )

    def _validate_norm(self) -> None:
        """`norm` applies to the CPU-sized networks only; FedBN needs layers to keep."""
        if self.norm != "instance" and self.model not in NORM_CONFIGURABLE:
            _bad("norm", self.norm, f"'instance' for model {self.model} (it has its own)")
        if self.strategy == "fedbn" and self.model in NORM_CONFIGURABLE and self.norm != "batch":
            _bad(
                "norm",
                self.norm,
                f"'batch' with strategy fedbn: {self.model} with instance norm has no "
                "normalisation weights or statistics for the hospitals to keep",
            )

    def _validate_ranges(self) -> None:
        """Every number within its range (INT_RANGES, FLOAT_RANGES), floats finite."""
        for attr, (low, high) in INT_RANGES.items():
            if not low <= getattr(self, attr) <= high:
                _bad(attr, getattr(self, attr), f"an integer in {low}..{high}")
        for attr, (low, high, closed) in FLOAT_RANGES.items():
            value = getattr(self, attr)
            above_low = value >= low if closed else value > low
            if not (math.isfinite(value) and above_low and value <= high):
                _bad(attr, value, f"a number in {'[' if closed else '('}{low!r}, {high!r}]")

    def _validate_preprocessing(self) -> None:
        """The modality code, the CT window and the resampling spacing."""
        if self.modality != "auto" and not MODALITY.fullmatch(self.modality):
            _bad("modality", self.modality, "auto, or a DICOM modality code such as CT or MR")
        try:
            low, high = self.ct_window_range
        except ValueError:
            low, high = 0.0, 0.0
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            _bad("ct_window", self.ct_window, "two finite numbers 'low,high' with low < high")
        if self.spacing:
            try:
                spacing = self.pixel_spacing
            except ValueError:
                spacing = ()
            if len(spacing) != DESCRIPTIONS[self.task].spatial_dims or not all(
                0 < v <= MAX_SPACING_MM for v in spacing
            ):
                _bad(
                    "spacing",
                    self.spacing,
                    f"spacings in (0, {MAX_SPACING_MM:g}] mm, one per spatial axis",
                )

    def _validate_sizes(self) -> None:
        """Image and patch sizes against the network's depth, the number of classes."""
        divisor = 2**self.model_depth
        largest = MAX_IMAGE_SIZE[DESCRIPTIONS[self.task].spatial_dims]
        if not 16 <= self.image_size <= largest or self.image_size % divisor:
            _bad(
                "image_size",
                self.image_size,
                f"16..{largest} for this task, divisible by 2**model-depth ({divisor})",
            )
        if self.patch_size and not (
            0 < self.patch_size <= self.image_size and self.patch_size % divisor == 0
        ):
            _bad(
                "patch_size",
                self.patch_size,
                f"0, or at most image-size and divisible by 2**model-depth ({divisor})",
            )
        if len(self.classes) > MAX_CLASSES:
            _bad("class_names", f"{len(self.classes)} names", f"at most {MAX_CLASSES} classes")

    def _validate_training(self) -> None:
        """Sampling, the GAN settings and the update checks (numeric ranges: FLOAT_RANGES)."""
        if self.server_lr and self.strategy not in SERVER_STEP_STRATEGIES:
            _bad(
                "server_lr",
                self.server_lr,
                f"0 unless strategy is {'/'.join(SERVER_STEP_STRATEGIES)}",
            )
        if self.krum_byzantine and self.strategy != "krum":
            _bad("krum_byzantine", self.krum_byzantine, "0 unless strategy is krum")
        if 0 < self.update_norm_factor < 1:
            _bad("update_norm_factor", self.update_norm_factor, "0 (off) or at least 1")
        if not 0 < self.val_fraction < 1:
            _bad("val_fraction", self.val_fraction, "in (0, 1)")
        if self.gan_augment_ratio > 0 and not self.gan_model:
            _bad("gan_model", self.gan_model, "a gan run folder when gan-augment-ratio > 0")
        if self.gan_augment_ratio > 0 and self.task != "classification":
            _bad("gan_augment_ratio", self.gan_augment_ratio, "0 unless task is classification")

    def _validate_privacy(self) -> None:
        if self.secure_aggregation and self.strategy in ROBUST_STRATEGIES:
            _bad(
                "strategy",
                self.strategy,
                f"a weighted-mean strategy ({', '.join(MEAN_STRATEGIES)}) with "
                "secure-aggregation = true: it needs each hospital's update, which "
                "secure aggregation hides from the coordinator",
            )
        if self.secagg_neighbours == 1:
            _bad("secagg_neighbours", self.secagg_neighbours, "0 (everyone) or at least 2")
        if self.secagg_threshold == 1:
            _bad("secagg_threshold", self.secagg_threshold, "0 (strict majority) or at least 2")
        if self.dp_mode not in DP_MODES:
            _bad("dp_mode", self.dp_mode, f"one of {', '.join(DP_MODES)}")
        if self.dp_mode == "server" and self.secure_aggregation:
            _bad(
                "dp_mode",
                self.dp_mode,
                "'client' with secure-aggregation = true (server-side clipping needs "
                "each hospital's update)",
            )
        if self.dp_mode != "off" and self.strategy in ROBUST_STRATEGIES:
            _bad("dp_mode", self.dp_mode, f"'off' with strategy {self.strategy}")
        if not 0 < self.dp_delta < 1:
            _bad("dp_delta", self.dp_delta, "in (0, 1)")
        self._validate_noise()
        self._validate_cross_site()

    def _validate_noise(self) -> None:
        """Noise at the hospitals needs the sum to hide each share of it (secure aggregation,
        client-side clipping to a fixed norm) and a group each hospital can count."""
        if self.dp_noise not in DP_NOISE:
            _bad("dp_noise", self.dp_noise, f"one of {', '.join(DP_NOISE)}")
        if self.dp_noise == "hospitals" and not self.hospitals_can_add_noise:
            _bad(
                "dp_noise",
                self.dp_noise,
                "'coordinator' or 'auto' unless dp.mode = 'client' with fixed clipping "
                "(dp.adaptive = false), secure-aggregation = true and secagg-neighbours = 0 "
                "(each hospital counts the hospitals its noise is shared with)",
            )

    @property
    def hospitals_can_add_noise(self) -> bool:
        """Whether each hospital can add its share of the noise inside its masked update."""
        return (
            self.dp_mode == "client"
            and not self.dp_adaptive
            and self.secure_aggregation
            and self.secagg_neighbours == 0
        )

    @property
    def noise_at_hospitals(self) -> bool:
        """DP noise added by the hospitals (inside the masked vector), not the coordinator."""
        return self.dp_noise != "coordinator" and self.hospitals_can_add_noise

    def _validate_cross_site(self) -> None:
        """Cross-site "all" sends each hospital's un-aggregated local model to the other
        hospitals: secure aggregation and DP exist so that no such model leaves the sum."""
        if self.cross_site != "all":
            return
        protections = [
            name
            for name, on in (
                ("secure-aggregation = true", self.secure_aggregation),
                (f"dp.mode = '{self.dp_mode}'", self.dp_mode != "off"),
            )
            if on
        ]
        if protections:
            _bad(
                "cross_site",
                self.cross_site,
                f"'global' or 'off' with {' and '.join(protections)}: 'all' sends each "
                "hospital's un-aggregated local model to the other hospitals, which would "
                f"defeat {'them' if len(protections) > 1 else 'it'}",
            )

    def _validate_bundle(self) -> None:
        """`bundle` names the bundle of a bundle run, and only then; the settings medfed
        itself would apply to its own networks must not pretend to apply to a bundle's."""
        if self.task == "bundle" and not self.bundle.strip():
            _bad("bundle", self.bundle, "a MONAI bundle folder (holding configs/train.json)")
        if self.task != "bundle" and self.bundle:
            _bad("bundle", self.bundle, "'' unless task is bundle")
        if self.task != "bundle":
            return
        if self.strategy == "fedbn":
            _bad(
                "strategy",
                self.strategy,
                "any but fedbn with task = bundle (the bundle's network decides its "
                "normalisation layers; medfed keeps none at the hospitals)",
            )
        if self.freeze != "none":
            _bad("freeze", self.freeze, "'none' with task = bundle (the bundle's trainer trains)")

    @property
    def keeps_norms_local(self) -> bool:
        """FedBN: normalisation layers never leave a hospital and are never averaged."""
        return self.strategy == "fedbn"

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in label order; for segmentation index 0 is background."""
        return tuple(name.strip() for name in self.class_names.split(",") if name.strip())

    @property
    def ct_window_range(self) -> tuple[float, float]:
        low, high = (float(v) for v in self.ct_window.split(","))
        return low, high

    @property
    def pixel_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.spacing.split(","))

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser()


def config_key(name: str) -> str:
    """The run-config key of a field: kebab case; `dp_*` fields live in the `dp` table."""
    key = name.replace("_", "-")
    return "dp." + key[3:] if key.startswith("dp-") else key


def _field_type(annotation: Any) -> type:
    # `from __future__ import annotations` leaves the annotations as strings.
    return {"int": int, "float": float, "str": str, "bool": bool}[str(annotation)]


def _coerce(key: str, value: Any, target: type) -> Any:
    if target is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    if target is bool and isinstance(value, bool):
        return value
    if target is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and target in (int, float):
        try:
            return target(value)
        except ValueError:
            pass
    raise ConfigError(f"config key '{key}' = {value!r}: expected {target.__name__}")


def _bad(attr: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{config_key(attr)}' = {value!r}: expected {expected}")
