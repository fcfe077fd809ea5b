"""GPU path check and benchmark: medfed's local training loop vs a plain MONAI loop.

Run on a CUDA machine (never in CI):

    python -m tests.bench.gpu [--out DIR] [--steps N]

For each case it (1) checks that the task trains on CUDA (loss falls on a
repeated batch, metrics are finite) with the case's precision and memory
format, and (2) times images/s of `Task.train` (what the ClientApp runs)
against a textbook MONAI loop of the same network, batch, optimiser and
precision, alternating the two in the same process. Writes gpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.tasks.base import autocast


@dataclass(frozen=True)
class Case:
    name: str
    task: str
    batch: int
    overrides: dict = field(default_factory=dict)


CASES = [
    Case("unet2d-256-b32-fp32", "segmentation", 32,
         {"image-size": 256, "model-width": 32, "model-depth": 4}),
    Case("unet2d-256-b32-bf16-cl", "segmentation", 32,
         {"image-size": 256, "model-width": 32, "model-depth": 4, "precision": "bf16",
          "channels-last": True}),
    Case("densenet121-224-b64-fp32", "classification", 64,
         {"model": "densenet121", "image-size": 224}),
    Case("densenet121-224-b64-bf16-cl", "classification", 64,
         {"model": "densenet121", "image-size": 224, "precision": "bf16",
          "channels-last": True}),
    Case("unet3d-96-4ch-b2-fp32", "segmentation3d", 2,
         {"image-size": 96, "model-width": 16, "model-depth": 4}),
    Case("unet3d-96-4ch-b2-bf16", "segmentation3d", 2,
         {"image-size": 96, "model-width": 16, "model-depth": 4, "precision": "bf16"}),
    Case("dcgan-64-b128-fp32", "gan", 128, {"image-size": 64}),
    Case("dcgan-64-b128-bf16", "gan", 128, {"image-size": 64, "precision": "bf16"}),
]  # fmt: skip


def make_batches(cfg: RunConfig, batch: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Distinct pinned CPU batches, as a DataLoader with pin_memory would hand them over."""
    g = torch.Generator().manual_seed(0)
    task = TASKS[cfg.task]
    spatial = (cfg.image_size,) * task.spatial_dims
    classes = len(cfg.classes)
    out = []
    for _ in range(count):
        image = torch.randn(batch, cfg.in_channels, *spatial, generator=g)
        if cfg.task == "gan":
            image = image.sigmoid()  # real images arrive normalised to [0, 1]
        if task.label_kind == "mask":
            label = torch.randint(0, classes, (batch, 1, *spatial), generator=g).float()
        else:
            label = torch.randint(0, classes, (batch,), generator=g)
        out.append({"image": image.pin_memory(), "label": label.pin_memory()})
    return out


def plain_monai_loop(task, net, batches, cfg, device) -> None:
    """The loop a MONAI tutorial writes: no medfed code beyond building the network."""
    if cfg.task == "gan":
        return plain_gan_loop(net, batches, cfg, device)
    net.train()
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    loss_fn = task.build_loss(cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        y = y.long() if y.dim() > 1 else y.long().view(-1)
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg, device):
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()


def plain_gan_loop(net, batches, cfg, device) -> None:
    """A textbook conditional DCGAN step: D on real and fake, then G (non-saturating)."""
    net.train()
    bce = torch.nn.BCEWithLogitsLoss()
    d_opt = torch.optim.Adam(net.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(net.generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    for batch in batches:
        real = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True).long()
        ones = torch.ones(real.shape[0], device=device)
        with autocast(cfg, device):
            fake = net.generate(labels)
            d_loss = bce(net.discriminate(real, labels), ones) + bce(
                net.discriminate(fake.detach(), labels), 1 - ones
            )
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        with autocast(cfg, device):
            g_loss = bce(net.discriminate(fake, labels), ones)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def check_trains(task, cfg, device, batch) -> dict:
    """Correctness on CUDA: loss on one repeated batch must fall; metrics finite."""
    torch.manual_seed(0)
    net = task.build_network(cfg).to(device)
    fixed = make_batches(cfg, min(batch, 8), 1)
    if cfg.task == "gan":  # a GAN's losses need not fall; its discriminator must learn

        def d_loss() -> float:
            with torch.no_grad():
                real = fixed[0]["image"].to(device)
                labels = fixed[0]["label"].to(device).long()
                fake = net.generate(labels)
                ones = torch.ones(len(labels), device=device)
                bce = torch.nn.BCEWithLogitsLoss()
                return float(
                    bce(net.discriminate(real, labels), ones)
                    + bce(net.discriminate(fake, labels), 1 - ones)
                )

        before = d_loss()
        task.train(net, fixed * 30, cfg, device)
        after = d_loss()
        return {
            "loss-before": before,
            "loss-after": after,
            "loss-falls": after < before,
            "metrics-finite": after == after,
            "device": str(next(net.parameters()).device),
        }
    before = task.evaluate(net, fixed, cfg, device)["loss"]
    task.train(net, fixed * 30, cfg, device)
    metrics = task.evaluate(net, fixed, cfg, device)
    finite = all(v == v and abs(v) != float("inf") for v in metrics.values())
    return {
        "loss-before": before,
        "loss-after": metrics["loss"],
        "loss-falls": metrics["loss"] < before,
        "metrics-finite": finite,
        "device": str(next(net.parameters()).device),
    }


def bench(case: Case, steps: int, repeats: int) -> dict:
    device = torch.device("cuda")
    cfg = RunConfig.from_mapping(
        {"task": case.task, "batch-size": case.batch, "local-epochs": 1, **case.overrides}
    )
    task = TASKS[case.task]
    result = {"case": case.name, "check": check_trains(task, cfg, device, case.batch)}
    distinct = make_batches(cfg, case.batch, 4)
    batches = [distinct[i % len(distinct)] for i in range(steps)]
    torch.manual_seed(0)
    net_medfed = task.build_network(cfg).to(device)
    torch.manual_seed(0)
    net_plain = task.build_network(cfg).to(device)
    warm = batches[:5]
    task.train(net_medfed, warm, cfg, device)  # warm-up: cuDNN autotune, allocator
    plain_monai_loop(task, net_plain, warm, cfg, device)
    medfed_s, plain_s = [], []
    for _ in range(repeats):  # alternate, so drift in clocks hits both alike
        medfed_s.append(timed(lambda: task.train(net_medfed, batches, cfg, device)))
        plain_s.append(timed(lambda: plain_monai_loop(task, net_plain, batches, cfg, device)))
    images = steps * case.batch
    result.update(
        {
            "medfed-images-per-s": images / statistics.median(medfed_s),
            "plain-images-per-s": images / statistics.median(plain_s),
            "peak-memory-gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    )
    result["ratio"] = result["medfed-images-per-s"] / result["plain-images-per-s"]
    torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    print(f"card: {card}, torch {torch.__version__}")
    print(f"{'case':30} {'medfed img/s':>13} {'plain img/s':>12} {'ratio':>6} {'loss falls':>10}")
    results = []
    for case in CASES:
        if case.name not in args.cases:
            continue
        r = bench(case, args.steps, args.repeats)
        results.append(r)
        print(
            f"{r['case']:30} {r['medfed-images-per-s']:13.0f} {r['plain-images-per-s']:12.0f}"
            f" {r['ratio']:6.3f} {r['check']['loss-falls']!s:>10}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(
        json.dumps({"card": card, "torch": torch.__version__, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
