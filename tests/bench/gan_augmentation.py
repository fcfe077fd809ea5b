"""Does federated GAN augmentation raise the recall of a class most hospitals rarely see?

    python -m tests.bench.gan_augmentation [--rounds 15] [--gan-rounds 20] [--out DIR]

Three synthetic hospitals: two where COVID-like images are 5 % of cases, one
where they are 30 %. In the same run and with the same seeds it trains
(1) a federated conditional GAN, (2) a federated classifier without and
(3) with GAN augmentation (each site adds generated images of its scarce
classes), then scores both classifiers on a separate, balanced test site.
Writes gan_augmentation.json; prints minority recall, AUC and accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from medfed.client.data.loader import make_loader
from medfed.client.data.site import load_site
from medfed.client.synthetic import generate_site
from medfed.shared_models.run_folder import load_global_model
from medfed.shared_models.tasks import TASKS
from tests.bench.runs import print_table, save_results, simulate

PREVALENCE = [(0.55, 0.40, 0.05), (0.50, 0.45, 0.05), (0.40, 0.30, 0.30)]


def run(out: Path, data: Path, task: str, rounds: int, *config: str) -> Path:
    """A `medfed simulate` run on the benchmark's sites; its run folder."""
    simulate(out, task, rounds, *config, data=data)
    return out


def score(run: Path, test_site: Path) -> dict[str, float]:
    cfg, net = load_global_model(run)
    site = load_site(test_site, cfg)
    items = site.train + site.val
    cpu = torch.device("cpu")
    return TASKS["classification"].evaluate(
        net, make_loader(site, items, cfg, train=False, device=cpu), cfg, cpu
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--gan-rounds", type=int, default=20)
    parser.add_argument("--images-per-site", type=int, default=90)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medfed-gan-bench-"))
    data = work / "federation"
    for i, prevalence in enumerate(PREVALENCE):
        generate_site(
            "classification",
            i,
            data / f"site-{i}",
            seed=7,
            images_per_site=args.images_per_site,
            class_prevalence=prevalence,
        )
    test_site = generate_site(
        "classification",
        9,
        work / "test-site",
        seed=7,
        images_per_site=150,
        class_prevalence=(1 / 3, 1 / 3, 1 / 3),
    )
    gan = run(work / "gan", data, "gan", args.gan_rounds)
    plain = run(work / "plain", data, "classification", args.rounds)
    augmented = run(
        work / "augmented",
        data,
        "classification",
        args.rounds,
        f"gan-model={gan}",
        f"gan-augment-ratio={args.ratio}",
    )
    gan_metrics = json.loads((gan / "metrics.json").read_text())["rounds"][-1]["global"]
    results = {
        "without": score(plain, test_site),
        "with": score(augmented, test_site),
        "gan": {"fid": gan_metrics["fid"], "tstr-accuracy": gan_metrics["tstr-accuracy"]},
        "rounds": args.rounds,
        "gan-rounds": args.gan_rounds,
        "ratio": args.ratio,
        "prevalence": PREVALENCE,
        "work": str(work),
    }
    print_table(
        {"classifier": 22, "covid recall": 12, "macro AUC": 10, "accuracy": 9},
        [
            [f"{name} GAN augmentation"]
            + [f"{results[name][k]:.3f}" for k in ("recall-covid", "auc", "accuracy")]
            for name in ("without", "with")
        ],
    )
    print(
        f"GAN after {args.gan_rounds} rounds: FID {results['gan']['fid']:.3f}, "
        f"TSTR accuracy {results['gan']['tstr-accuracy']:.3f}"
    )
    save_results(args.out, "gan_augmentation.json", results)


if __name__ == "__main__":
    main()
