"""Weight exchange between a torch `state_dict` and a Flower `ArrayRecord`.

Only floating-point entries travel. Integer buffers (BatchNorm's
`num_batches_tracked`) are counters, not weights: Flower's weighted mean
would turn them into floats, so each site keeps its own. Under FedBN
(`local_norms=True`) the normalisation layers stay at the sites as well:
their statistics and affine terms describe one hospital's scanners, and
averaging them is what FedBN shows hurts on non-IID features.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from medfed.shared_models.arrays import readable

# Layers whose parameters and buffers normalise activations (BatchNorm and InstanceNorm
# derive from _NormBase): what FedBN keeps at each hospital.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(net: nn.Module) -> list[str]:
    """The state-dict keys of the network's normalisation layers, in order."""
    prefixes = tuple(
        f"{name}." for name, module in net.named_modules() if isinstance(module, NORM_LAYERS)
    )
    return [k for k in net.state_dict() if prefixes and k.startswith(prefixes)]


def exchanged_keys(net: nn.Module, local_norms: bool = False) -> list[str]:
    """The state-dict keys that are averaged across hospitals, in order."""
    local = set(norm_keys(net)) if local_norms else set()
    return [k for k, v in net.state_dict().items() if torch.is_floating_point(v) and k not in local]


def exchanged_arrays(net: nn.Module, local_norms: bool = False) -> OrderedDict[str, np.ndarray]:
    """The exchanged part of the network's weights as NumPy arrays (copies), in order."""
    state = net.state_dict()
    return OrderedDict(
        (k, state[k].detach().cpu().numpy().copy()) for k in exchanged_keys(net, local_norms)
    )


def to_record(net: nn.Module, local_norms: bool = False) -> ArrayRecord:
    """The exchanged part of the network's weights, as float32-preserving arrays."""
    arrays = exchanged_arrays(net, local_norms)
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


# The names and shapes of the exchanged arrays, in order.
Template = Mapping[str, tuple[int, ...]]


def net_template(net: nn.Module, local_norms: bool = False) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the arrays `net` exchanges."""
    state = net.state_dict()
    return {key: tuple(state[key].shape) for key in exchanged_keys(net, local_norms)}


def record_template(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the arrays in `record`."""
    return {key: tuple(array.shape) for key, array in record.items()}


def load_record(net: nn.Module, record: ArrayRecord, local_norms: bool = False) -> None:
    """Copy received weights into `net`; keys and shapes must match exactly."""
    problems = incompatibilities(record, net_template(net, local_norms))
    if problems:
        raise ValueError("received weights do not fit the model: " + "; ".join(problems[:5]))
    state = {k: torch.from_numpy(np.array(record[k].numpy())) for k in record}
    net.load_state_dict(state, strict=False)


def incompatibilities(record: ArrayRecord, template: Template) -> list[str]:
    """Why `record` cannot stand for arrays of `template` (empty when it can).

    Names, shapes, a float dtype and finite values: the hospital checks what
    it receives, the coordinator every update before it is averaged, so one
    broken or rogue party cannot poison a model with a wrong shape or a NaN.
    """
    expected = list(template)
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
        want = tuple(template[key])
        if tuple(array.shape) != want:
            problems.append(f"'{key}' has shape {tuple(array.shape)}, expected {want}")
            continue
        values = readable(array)
        if values is None or values.shape != want:
            problems.append(f"'{key}' is not a readable array of shape {want}")
        elif not np.issubdtype(values.dtype, np.floating):
            problems.append(f"'{key}' has dtype {values.dtype}, expected a float type")
        elif not np.isfinite(values).all():
            problems.append(f"'{key}' contains NaN or infinite values")
    return problems


def state_dict_from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """A torch state dict of the record's arrays (used to save the global model)."""
    return OrderedDict((k, torch.from_numpy(np.array(record[k].numpy()))) for k in record)


def record_from_state_dict(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The arrays of a saved state dict as a record, in order (the inverse of the above)."""
    return ArrayRecord(OrderedDict((k, Array(v.detach().cpu().numpy())) for k, v in state.items()))
