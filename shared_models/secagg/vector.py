"""A model's arrays as one flat vector, in the model's key order, and back.

Masking one vector instead of hundreds of arrays (a DenseNet has ~600) turns
hundreds of small keystream calls and (de)serialisations into one each.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten(arrays: Mapping[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """float32 concatenation of `arrays[k]` for k in `keys`."""
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in keys])


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
