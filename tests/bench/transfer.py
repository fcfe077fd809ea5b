"""Transfer learning: rounds to reach a target bone-age MAE from pretrained weights vs scratch.

    python -m tests.bench.transfer [--rounds 15] [--target 20] [--out DIR]

Pretrains a federated chest-X-ray classifier (a different synthetic task,
same backbone), then trains the bone-age regressor twice with the same
seeds: from scratch, and from the classifier's weights (the head is skipped
because its shape differs). Reports the first round at which the global
validation MAE reaches the target, and the MAE curves. Writes transfer.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.bench.runs import print_table, save_results, simulate


def metric_curve(out: Path, task: str, rounds: int, *config: str) -> list[float]:
    """The global validation MAE (regression) or AUC of every round of one run."""
    metric = "mae" if task == "regression" else "auc"
    return [r["global"][metric] for r in simulate(out, task, rounds, *config)["rounds"]]


def first_round(curve: list[float], target: float) -> int | None:
    return next((i for i, mae in enumerate(curve) if mae <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pretrain-rounds", type=int, default=15)
    parser.add_argument("--target", type=float, default=20.0, help="MAE in months")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medfed-transfer-bench-"))
    pretrain = metric_curve(
        work / "pretrain", "classification", args.pretrain_rounds, f"model={args.model}"
    )
    scratch = metric_curve(work / "scratch", "regression", args.rounds, f"model={args.model}")
    transfer = metric_curve(
        work / "transfer",
        "regression",
        args.rounds,
        f"model={args.model}",
        f"pretrained-weights={work / 'pretrain'}",
    )
    results = {
        "target-mae": args.target, "model": args.model,
        "pretrain-final-auc": pretrain[-1],
        "scratch": {"curve": scratch, "rounds-to-target": first_round(scratch, args.target)},
        "pretrained": {"curve": transfer, "rounds-to-target": first_round(transfer, args.target)},
        "work": str(work),
    }  # fmt: skip
    print(f"pretraining: chest-X-ray classifier, final AUC {pretrain[-1]:.3f}")
    rows = []
    for name in ("scratch", "pretrained"):
        curve, reached = results[name]["curve"], results[name]["rounds-to-target"]
        marks = (curve[1], curve[min(5, len(curve) - 1)], curve[-1])
        rows.append([name, "not reached" if reached is None else str(reached)])
        rows[-1] += [f"{mae:.1f}" for mae in marks]
    columns = {"start": 12, f"rounds to MAE<={args.target:g}": 18, "MAE r1": 8, "MAE r5": 8}
    print_table({**columns, "final MAE": 10}, rows)
    save_results(args.out, "transfer.json", results)


if __name__ == "__main__":
    main()
