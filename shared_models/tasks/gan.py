"""A class-conditional DCGAN trained federated, for augmenting scarce classes.

Generator and discriminator live in one module, so Flower exchanges and
averages both. Each round every site reports, on its own real validation
images: train-on-synthetic/test-on-real accuracy (a classifier trained only
on generated images, tested on real ones) and the Fréchet distance between
real and generated images in the feature space of a classifier.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from monai.metrics import FIDMetric
from monai.networks.nets import Discriminator, Generator
from torch import nn
from torch.nn import functional as F

from medfed.shared_models.config import RunConfig
from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Batch, Task, autocast


class ConditionalGAN(nn.Module):
    """MONAI's DCGAN-style Generator and Discriminator, conditioned on the class.

    The class enters the generator as a one-hot vector beside the latent code
    and the discriminator as constant one-hot image planes (the standard cGAN
    construction; MONAI has no conditional GAN network).
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.num_classes, self.latent = len(cfg.classes), cfg.latent_size
        depth, width, size = cfg.model_depth, cfg.model_width, cfg.image_size
        start = size // 2**depth
        self.generator = Generator(
            latent_shape=(self.latent + self.num_classes,),
            start_shape=(width * 2**depth, start, start),
            channels=(*(width * 2 ** (depth - 1 - i) for i in range(depth)), cfg.in_channels),
            strides=(2,) * depth + (1,),
            num_res_units=0, norm="BATCH",
        )  # fmt: skip
        self.discriminator = Discriminator(
            in_shape=(cfg.in_channels + self.num_classes, size, size),
            channels=(*(width * 2**i for i in range(depth)), 1),
            strides=(2,) * depth + (1,),
            num_res_units=0, dropout=0.25, last_act=None,
        )  # fmt: skip

    def generate(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [0, 1] (the range sites normalise real images to) of `labels`."""
        z = torch.randn(
            labels.shape[0],
            self.latent,
            generator=generator,
            device=labels.device if generator is None else "cpu",
        ).to(labels.device)
        code = torch.cat([z, F.one_hot(labels, self.num_classes).float()], dim=1)
        return torch.sigmoid(self.generator(code))

    def discriminate(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One real/fake logit per image, conditioned on its class (as extra planes)."""
        planes = F.one_hot(labels, self.num_classes).float()[:, :, None, None]
        planes = planes.expand(-1, -1, *images.shape[2:])
        return self.discriminator(torch.cat([images, planes], dim=1)).view(-1)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Generated images of the given classes (what the global model is used for)."""
        return self.generate(labels)


def _classifier_config(cfg: RunConfig, width: int = 0) -> RunConfig:
    """A small CNN classifier's config for images of the GAN's size, channels and classes."""
    return RunConfig.from_mapping(
        {
            "task": "classification",
            "model": "smallcnn",
            "image-size": cfg.image_size,
            "in-channels": cfg.in_channels,
            "class-names": cfg.class_names,
            "model-width": width,
            "model-depth": cfg.model_depth,
        }
    )


def feature_network(cfg: RunConfig, feature_model: str) -> nn.Module:
    """Image features for FID: a federated classifier's, or a fixed random CNN's.

    With `gan-feature-model` naming a medfed classification run, its global
    model's penultimate features are used (no downloaded network). Without
    one, a seeded, randomly initialised CNN gives a weaker but stable basis.
    """
    from medfed.shared_models.networks import build_backbone
    from medfed.shared_models.pretrained import load_pretrained

    shape_cfg = _classifier_config(cfg)
    torch.manual_seed(1234)
    net = build_backbone(shape_cfg, outputs=len(cfg.classes))
    if feature_model:
        load_pretrained(net, Path(feature_model).expanduser())
    # Replace the Classifier's head with global average pooling: compact features
    # (one per channel) keep FID's covariance estimable from a site's few images.
    net.final = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.reshape = nn.Identity()
    return net.eval()


# TSTR accuracy within this of chance: the samples teach a classifier nothing useful.
TSTR_MARGIN = 0.1


class GANTask(Task):
    """A conditional GAN that learns to generate each class's images across hospitals;
    its quality is FID and the accuracy of a classifier trained on generated images."""

    description = DESCRIPTIONS["gan"]

    def outcome(self, metrics: dict[str, float], cfg: RunConfig) -> str | None:
        """TSTR accuracy against guessing: the default generator on the synthetic hospitals
        scores about chance (issue 25), which a newcomer could not tell from the number."""
        tstr = metrics.get(self.headline_metric)
        if tstr is None:
            return None
        chance = 1 / len(cfg.classes)
        if tstr < chance + TSTR_MARGIN:
            return (
                f"TSTR accuracy {tstr:.2f}, chance {chance:.2f}: a classifier trained only on "
                "this generator's images does no better than guessing, so its samples are "
                "not yet fit to augment a classifier (gan-augment-ratio); train longer or "
                "federate your own GAN from this one (docs/researcher.md, 'Federated GAN')"
            )
        return (
            f"TSTR accuracy {tstr:.2f}, chance {chance:.2f}: a classifier trained only on "
            "this generator's images tells the real classes apart better than guessing"
        )

    def build_network(self, cfg: RunConfig) -> nn.Module:
        return ConditionalGAN(cfg)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def targets(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch["label"].to(device, non_blocking=True).long().view(-1)

    def train(self, net, batches, cfg, device, proximal_mu=0.0, on_batch=None) -> float:
        """Alternating discriminator / generator steps (non-saturating loss)."""
        net.to(device).train()
        bce = self.build_loss(cfg)
        d_opt = torch.optim.Adam(net.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        g_opt = torch.optim.Adam(net.generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        anchor = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
        total, seen = torch.zeros((), device=device), 0
        for _ in range(cfg.local_epochs):
            for batch in batches:
                real = batch["image"].to(device, non_blocking=True)
                labels = self.targets(batch, device)
                ones = torch.ones(real.shape[0], device=device)
                with autocast(cfg, device):
                    fake = net.generate(labels)
                    d_loss = bce(net.discriminate(real, labels), ones) + bce(
                        net.discriminate(fake.detach(), labels), 1 - ones
                    )
                d_loss = d_loss + _proximal(net.discriminator, net, anchor, proximal_mu)
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
                with autocast(cfg, device):
                    g_loss = bce(net.discriminate(fake, labels), ones)
                g_loss = g_loss + _proximal(net.generator, net, anchor, proximal_mu)
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
                total += (d_loss.detach() + g_loss.detach()) * real.shape[0]
                seen += real.shape[0]
                if on_batch is not None:
                    on_batch()
        if seen == 0:
            raise RuntimeError("no training images: the site's training split is empty")
        return float(total.item()) / seen

    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Discriminator loss, TSTR accuracy and FID, all against this site's real images."""
        net.to(device).eval()
        real_images, real_labels = [], []
        for batch in batches:
            real_images.append(batch["image"])
            real_labels.append(self.targets(batch, torch.device("cpu")))
        if not real_images:
            raise RuntimeError("no validation images: the site's validation split is empty")
        images, labels = torch.cat(real_images), torch.cat(real_labels)
        seeded = torch.Generator().manual_seed(cfg.seed)
        per_class = max(16, 2 * cfg.batch_size)
        synthetic_labels = torch.arange(len(cfg.classes)).repeat_interleave(per_class)
        with torch.no_grad():
            synthetic = net.generate(synthetic_labels.to(device), seeded).float().cpu()
            ones = torch.ones(len(labels))
            bce = self.build_loss(cfg)
            d_loss = float(bce(net.discriminate(images.to(device), labels.to(device)).cpu(), ones))
            matched = net.generate(labels.to(device), seeded).float()
            d_loss += float(bce(net.discriminate(matched, labels.to(device)).cpu(), 1 - ones))
            features = feature_network(cfg, cfg.gan_feature_model)
            fid = FIDMetric()(features(synthetic), features(images.float()))
        return {
            "loss": d_loss,
            "tstr-accuracy": tstr_accuracy(synthetic, synthetic_labels, images, labels, cfg),
            "fid": float(fid),
        }


def tstr_accuracy(
    synthetic: torch.Tensor,
    synthetic_labels: torch.Tensor,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    cfg: RunConfig,
    epochs: int = 15,
) -> float:
    """Train a small classifier on generated images only; its accuracy on real ones."""
    from medfed.shared_models.networks import build_backbone

    torch.manual_seed(cfg.seed)
    shape_cfg = _classifier_config(cfg, width=8)
    classifier = build_backbone(shape_cfg, outputs=len(cfg.classes))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(synthetic), generator=order).split(32):
            loss = F.cross_entropy(classifier(synthetic[idx]), synthetic_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = classifier.eval()(real.float()).argmax(dim=1)
    return float((predicted == real_labels).float().mean())


def _proximal(part: nn.Module, net: nn.Module, anchor: list[torch.Tensor], mu: float):
    if not anchor:
        return 0.0
    start = dict(zip((id(p) for p in net.parameters()), anchor, strict=True))
    return mu / 2 * sum((p - start[id(p)]).pow(2).sum() for p in part.parameters())
