"""Aggregation throughput: medfed's coordinator path vs a plain NumPy weighted average.

    python -m tests.bench.aggregation [--updates 10] [--megabytes 77] [--repeats 3]

Ten hospitals' updates of a ~77 MB float32 model (layer-sized arrays) go
through what the coordinator does with a training round's replies: every
reply checked (`ReplyCollector.collect`: readable arrays, names, shapes, dtypes,
finite values, metrics, the update-norm check against the cohort's median)
and averaged by Flower's FedAvg. The baselines, in the same run: NumPy's
stack-and-average, and the best plain loop (an in-place weighted sum, no
temporaries). Each case runs in a fresh process; its time is the median of
`--repeats` after one warm-up, and its memory the process's peak above its
size once the updates are built (the updates themselves are not counted).
Writes a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = ("numpy-stack", "numpy-inplace", "medfed", "medfed-no-norm-check")
MB = 2**20


def layer_shapes(megabytes: float) -> list[tuple[int, ...]]:
    """Conv-like float32 arrays adding up to about `megabytes` (a ResNet-sized model)."""
    shapes, total, width = [], 0, 64
    target = int(megabytes * MB / 4)
    while total < target:
        shape = (width, width, 3, 3)
        shapes += [shape, (width,)]
        total += int(np.prod(shape)) + width
        width = min(width * 2, 512) if len(shapes) % 8 == 0 else width
    return shapes


def build(updates: int, megabytes: float) -> tuple[dict, list[dict], list[float]]:
    rng = np.random.default_rng(0)
    sent = {
        f"layer{i}": rng.standard_normal(s, np.float32)
        for i, s in enumerate(layer_shapes(megabytes))
    }
    replies = [
        {
            k: v + np.float32(0.01 * (n + 1)) * rng.standard_normal(v.shape, np.float32)
            for k, v in sent.items()
        }
        for n in range(updates)
    ]
    weights = [float(10 + 5 * n) for n in range(updates)]
    return sent, replies, weights


def numpy_stack(sent: dict, replies: list[dict], weights: list[float]) -> dict:
    return {k: np.average(np.stack([r[k] for r in replies]), axis=0, weights=weights) for k in sent}


def numpy_inplace(sent: dict, replies: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    out = {}
    for k in sent:
        acc = np.multiply(replies[0][k], weights[0] / total)
        scratch = np.empty_like(acc)
        for reply, weight in zip(replies[1:], weights[1:], strict=True):
            np.multiply(reply[k], weight / total, out=scratch)
            acc += scratch
        out[k] = acc
    return out


class PrebuiltGrid:
    """A grid whose hospitals have already answered: replies are handed back at once."""

    def __init__(self, replies: list, weights: list[float]) -> None:
        self.arrays, self.weights = replies, weights

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.arrays) + 1))

    def push_messages(self, messages):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        from medfed.shared_models.protocol import Metric, Record, SiteKey

        ids, self.outbox = [], []
        for n, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{n}"
            ids.append(f"m{n}")
            metrics = {Metric.WEIGHT: self.weights[n], Metric.NUM_EXAMPLES: 10}
            content = RecordDict({
                Record.ARRAYS: self.arrays[n],
                Record.METRICS: MetricRecord(metrics),
                Record.SITE: ConfigRecord({SiteKey.NAME: f"site-{n}"}),
            })  # fmt: skip
            reply = Message(content=content, reply_to=message)
            self.outbox.append(reply)
        return ids

    def pull_messages(self, ids):
        ready, self.outbox = self.outbox, []
        return ready


def medfed_path(norm_factor: float):
    """The coordinator's training-round step: check every reply, then FedAvg. The replies
    arrive as Flower records (serialised arrays), as they do from the SuperLink: building
    them is set-up, not timed."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from medfed.server.run.exchange import Exchange
    from medfed.server.run.replies import ReplyCollector, SiteNames
    from medfed.shared_models.protocol import Metric, Record
    from tests.in_process_grid import act_as_coordinator

    act_as_coordinator()
    built: dict[int, tuple] = {}

    def step(sent: dict, replies: list[dict], weights: list[float]) -> dict:
        if id(replies) not in built:
            sent_record = ArrayRecord({k: Array(v) for k, v in sent.items()})
            records = [ArrayRecord({k: Array(v) for k, v in r.items()}) for r in replies]
            built[id(replies)] = (sent_record, records)
        sent_record, records = built[id(replies)]
        grid = PrebuiltGrid(records, weights)
        content = RecordDict({Record.ARRAYS: sent_record, Record.CONFIG: ConfigRecord()})
        messages = [Message(content=content, dst_node_id=n, message_type="train")
                    for n in grid.get_node_ids()]  # fmt: skip
        collector = ReplyCollector(Exchange(grid, 60.0), SiteNames(), norm_factor=norm_factor)
        result = collector.collect(messages, sent_record)
        assert len(result.ok) == len(replies), result.failed
        arrays, _ = FedAvg(weighted_by_key=Metric.WEIGHT).aggregate_train(1, result.ok)
        return {k: arrays[k].numpy() for k in arrays}

    return step


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS


def run_case(case: str, updates: int, megabytes: float, repeats: int) -> dict:
    sent, replies, weights = build(updates, megabytes)
    step = {
        "numpy-stack": numpy_stack,
        "numpy-inplace": numpy_inplace,
        "medfed": medfed_path(10.0),
        "medfed-no-norm-check": medfed_path(0.0),
    }[case]
    reference = numpy_inplace(sent, replies, weights)
    result = step(sent, replies, weights)  # warm-up, and a check that it averages
    assert all(np.allclose(result[k], reference[k], atol=1e-5) for k in sent)
    del result
    seconds, peaks = [], []
    for _ in range(repeats):
        _reset_peak()
        before = _rss_kib("VmRSS:")
        started = time.perf_counter()
        out = step(sent, replies, weights)
        seconds.append(time.perf_counter() - started)
        peaks.append((_rss_kib("VmHWM:") - before) / 1024)
        del out
    update_bytes = updates * sum(v.nbytes for v in sent.values())
    median = statistics.median(seconds)
    return {"case": case, "seconds": median, "gbps": update_bytes / median / 1e9,
            "peak_mb": max(peaks), "update_mb": update_bytes / MB}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--megabytes", type=float, default=77.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in-process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.updates, args.megabytes, args.repeats)))
        return
    rows = []
    for case in CASES:
        done = subprocess.run(
            [sys.executable, "-m", "tests.bench.aggregation", "--case", case,
             "--updates", str(args.updates), "--megabytes", str(args.megabytes),
             "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{case}: {rows[-1]['seconds']:.3f}s", file=sys.stderr)
    best = next(r for r in rows if r["case"] == "numpy-inplace")
    print(f"{args.updates} updates of {rows[0]['update_mb'] / args.updates:.0f} MB "
          f"({rows[0]['update_mb']:.0f} MB in all), median of {args.repeats}\n")  # fmt: skip
    print("| path | seconds | GB/s | × best plain | peak memory above the updates (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.3f} | {r['gbps']:.2f} | "
              f"{r['seconds'] / best['seconds']:.2f} | {r['peak_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
