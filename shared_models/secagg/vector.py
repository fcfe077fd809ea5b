"""A model's arrays as one flat vector, in the model's key order, and back.

Masking one vector instead of hundreds of arrays (a DenseNet has ~600) turns
hundreds of small keystream calls and (de)serialisations into one each.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def difference(
    after: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray], keys: list[str]
) -> np.ndarray:
    """float32 vector of `after[k] - before[k]` for k in `keys`, written in one pass.

    Subtracting straight into the vector, from read-only views of the message
    bytes, skips the two model-sized copies and the concatenation that
    flattening both sides first would cost (a third of a hospital's masking).
    """
    for key in keys:  # np.subtract would broadcast a one-value array silently
        if after[key].shape != before[key].shape:
            raise ValueError(
                f"array '{key}' has shape {after[key].shape}, but {before[key].shape} before"
            )
    sizes = [after[k].size for k in keys]
    out = np.empty(sum(sizes), dtype=np.float32)
    start = 0
    for key, size in zip(keys, sizes, strict=True):
        np.subtract(
            after[key].reshape(-1), before[key].reshape(-1), out=out[start : start + size],
            dtype=np.float32, casting="unsafe",
        )  # fmt: skip
        start += size
    return out


def split(vector: np.ndarray, template: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The inverse of `flatten` for arrays of the shapes in `template` (views, no copies)."""
    sizes = [int(np.prod(shape)) for shape in template.values()]
    if sum(sizes) != vector.size:
        raise ValueError(f"vector of {vector.size} values does not fit {sum(sizes)}")
    offsets = np.cumsum([0, *sizes])
    return {
        key: vector[offsets[i] : offsets[i + 1]].reshape(shape)
        for i, (key, shape) in enumerate(template.items())
    }
