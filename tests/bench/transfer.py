"""Transfer learning: rounds to reach a target bone-age MAE from pretrained weights vs scratch.

    python tests/bench/transfer.py [--rounds 15] [--target 20] [--out DIR]

Pretrains a federated chest-X-ray classifier (a different synthetic task,
same backbone), then trains the bone-age regressor twice with the same
seeds: from scratch, and from the classifier's weights (the head is skipped
because its shape differs). Reports the first round at which the global
validation MAE reaches the target, and the MAE curves. Writes transfer.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def simulate(out: Path, task: str, rounds: int, *config: str) -> list[float]:
    command = [
        sys.executable,
        "-m",
        "medfed.server.cli",
        "simulate",
        "--task",
        task,
        "--rounds",
        str(rounds),
        "--out",
        str(out),
    ]
    for item in config:
        command += ["-c", item]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{task} run failed:\n{result.stdout}\n{result.stderr}")
    rounds_data = json.loads((out / "metrics.json").read_text())["rounds"]
    metric = "mae" if task == "regression" else "auc"
    return [r["global"][metric] for r in rounds_data]


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
    pretrain = simulate(
        work / "pretrain", "classification", args.pretrain_rounds, f"model={args.model}"
    )
    scratch = simulate(work / "scratch", "regression", args.rounds, f"model={args.model}")
    transfer = simulate(
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
    print(
        f"{'start':12} {'rounds to MAE<=' + format(args.target, 'g'):>18} {'MAE r1':>8} "
        f"{'MAE r5':>8} {'final MAE':>10}"
    )
    for name in ("scratch", "pretrained"):
        curve = results[name]["curve"]
        reached = results[name]["rounds-to-target"]
        print(
            f"{name:12} {str(reached) if reached is not None else 'not reached':>18} "
            f"{curve[1]:8.1f} {curve[min(5, len(curve) - 1)]:8.1f} {curve[-1]:10.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
