"""Weight exchange between a torch `state_dict` and a Flower `ArrayRecord`.

Only floating-point entries travel. Integer buffers (BatchNorm's
`num_batches_tracked`) are counters, not weights: Flower's weighted mean
would turn them into floats, so each site keeps its own.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def exchanged_keys(net: nn.Module) -> list[str]:
    """The state-dict keys that are averaged across hospitals, in order."""
    return [k for k, v in net.state_dict().items() if torch.is_floating_point(v)]


def exchanged_arrays(net: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The exchanged part of the network's weights as NumPy arrays (copies), in order."""
    state = net.state_dict()
    return OrderedDict((k, state[k].detach().cpu().numpy().copy()) for k in exchanged_keys(net))


def to_record(net: nn.Module) -> ArrayRecord:
    """The exchanged part of the network's weights, as float32-preserving arrays."""
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in exchanged_arrays(net).items()))


def load_record(net: nn.Module, record: ArrayRecord) -> None:
    """Copy received weights into `net`; keys and shapes must match exactly."""
    problems = incompatibilities(record, net)
    if problems:
        raise ValueError("received weights do not fit the model: " + "; ".join(problems[:5]))
    state = {k: torch.from_numpy(np.array(record[k].numpy())) for k in record}
    net.load_state_dict(state, strict=False)


def incompatibilities(record: ArrayRecord, net: nn.Module) -> list[str]:
    """Why `record` cannot be an update of `net` (empty when it can).

    The server runs this on every reply before aggregation so that one broken
    or rogue hospital cannot poison the global model with a wrong shape, a
    wrong dtype or a NaN.
    """
    state = net.state_dict()
    expected = exchanged_keys(net)
    problems = []
    missing = [k for k in expected if k not in record]
    extra = [k for k in record if k not in expected]
    if missing:
        problems.append(f"missing arrays {missing[:3]}")
    if extra:
        problems.append(f"unexpected arrays {extra[:3]}")
    for key in expected:
        if key not in record:
            continue
        array = record[key]
        want = tuple(state[key].shape)
        if tuple(array.shape) != want:
            problems.append(f"'{key}' has shape {tuple(array.shape)}, expected {want}")
            continue
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            problems.append(f"'{key}' has dtype {values.dtype}, expected a float type")
        elif not np.isfinite(values).all():
            problems.append(f"'{key}' contains NaN or infinite values")
    return problems


def state_dict_from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """A torch state dict of the record's arrays (used to save the global model)."""
    return OrderedDict((k, torch.from_numpy(np.array(record[k].numpy()))) for k in record)
