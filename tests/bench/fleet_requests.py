"""The largest Fleet request body a hospital sends: what the proxy's Fleet limit is sized from.

    python -m tests.bench.fleet_requests [--width 0] [--out DIR]

A hospital's reply travels as Flower objects: push-messages carries the message
without its content, then one push-object per object (the record, each array,
each chunk of an array). Flower's HTTP client sends each as
`PushObjectRequest.SerializeToString()`, so the byte size of that request, built
here with Flower's own objects from every model family's default network (and
the one masked vector of a secure round), is the HTTP body the proxy receives.
Arrays are cut into chunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB),
so the largest body stays near 5 MiB however large the model. Writes
fleet_requests.json.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from medfed.server.coordinator.proxy import Limits
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import to_record
from tests.bench.runs import print_table, save_results

LARGEST_ID = 2**64 - 1  # node and run ids are uint64: the longest varints


def largest_push_object(content: RecordDict) -> tuple[int, int]:
    """(the largest push-object body, how many objects) for a reply carrying `content`."""
    objects = get_all_nested_objects(content)
    sizes = [
        PushObjectRequest(
            node=Node(node_id=LARGEST_ID),
            run_id=LARGEST_ID,
            object_id=object_id,
            object_content=obj.deflate(),
            session_id=str(uuid.uuid4()),
        ).ByteSize()
        for object_id, obj in objects.items()
    ]
    return max(sizes), len(sizes)


def families(width: int) -> list[tuple[str, RecordDict]]:
    """(name, reply content) for every task's networks that build without a download, and
    the masked vector a secure round sends instead of the largest of them."""
    found, largest = [], 0
    for name, task in TASKS.items():
        for model in task.models if name != "bundle" else ():
            values = {"task": name, "model": model, **({"model-width": width} if width else {})}
            try:
                net = task.build_network(RunConfig.from_mapping(values))
            except (OSError, RuntimeError, ValueError) as err:  # a pretrained download
                print(f"{name}/{model}: skipped ({err})")
                continue
            largest = max(largest, sum(p.numel() for p in net.state_dict().values()))
            found.append((f"{name}/{model}", RecordDict({"arrays": to_record(net)})))
    masked = ArrayRecord({"masked": Array(np.zeros(largest, dtype=np.uint32))})
    found.append((f"secure round, masked vector of {largest} values", RecordDict({"a": masked})))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=0, help="model-width (0: each default)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="fleet-")))
    args = parser.parse_args()
    rows = []
    for name, content in families(args.width):
        body, objects = largest_push_object(content)
        rows.append({"reply": name, "objects": objects, "largest_body": body})
    print_table(
        {"reply": 48, "objects": 8, "largest body (bytes)": 21},
        [[r["reply"], str(r["objects"]), str(r["largest_body"])] for r in rows],
    )
    chunk, limit = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, Limits().fleet_body_mib * 2**20
    largest = max(row["largest_body"] for row in rows)
    print(f"largest Fleet body {largest} bytes (chunk {chunk}); default limit {limit} bytes "
          f"({limit / largest:.2f}x)")  # fmt: skip
    save_results(args.out, "fleet_requests.json", {"rows": rows, "largest": largest})


if __name__ == "__main__":
    main()
