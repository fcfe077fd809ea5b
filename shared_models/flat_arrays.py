"""A model message's arrays as one flat array on the wire, and back.

Flower sends a message object by object: each array is a record entry, an
array object and its data chunks, and a 26-array model travelled as ~46
objects each way, each a request through the proxy and the SuperNode's
store (docs/benchmarks.md, "Deployed round latency"). Secure rounds already
upload one masked vector; here every model message does: the coordinator's
exchange (server/run/exchange.py) packs a message's arrays into one byte array
plus a layout (names, dtypes, shapes) before sending, and the hospital's
`packed_arrays_mod` (client/packed_arrays.py) unpacks it before any handler or mod sees
it, and packs the reply. Bytes are carried exactly (any numeric dtype), so
handlers, strategies, digests and audits see the same named arrays as
before; only the packaging on the wire changed.

Written by hand: Flower has no packing of an ArrayRecord into one object.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from medfed.shared_models.protocol import Record

FLAT = "flat"  # the one array of a packed ArrayRecord
NAMES, DTYPES, SHAPES = "names", "dtypes", "shapes"
MAX_ARRAYS = 100_000
NUMERIC_KINDS = "biuf"


class LayoutError(ValueError):
    """A packed message whose layout does not describe its bytes; names what is wrong."""


def pack(arrays: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord] | None:
    """One uint8 array of every array's bytes (C order), and the layout to unpack it;
    None when an array is not a NumPy array of numbers (it then travels as it is)."""
    values = []
    for array in arrays.values():
        if array.stype != "numpy.ndarray":
            return None
        value = array.numpy()
        if value.dtype.kind not in NUMERIC_KINDS:
            return None
        values.append(np.asarray(value, order="C"))  # (ascontiguousarray makes 0-d 1-d)
    data = np.concatenate([np.zeros(0, np.uint8), *(v.reshape(-1).view(np.uint8) for v in values)])
    layout = ConfigRecord(
        {
            NAMES: list(arrays.keys()),
            DTYPES: [v.dtype.str for v in values],
            SHAPES: ["x".join(str(n) for n in v.shape) for v in values],
        }
    )
    return ArrayRecord({FLAT: Array(data)}), layout


def unpack(packed: ArrayRecord, layout: ConfigRecord) -> ArrayRecord:
    """The named arrays a packed record carries; LayoutError when the layout does not fit."""
    if list(packed.keys()) != [FLAT]:
        raise LayoutError(f"a packed record holds {list(packed.keys())[:3]}, not ['{FLAT}']")
    data = packed[FLAT].numpy()
    if data.dtype != np.uint8 or data.ndim != 1:
        raise LayoutError(f"the packed array is {data.dtype} {data.shape}, not 1-D uint8")
    names, dtypes, shapes = (_strings(layout, key) for key in (NAMES, DTYPES, SHAPES))
    if not len(names) == len(dtypes) == len(shapes) <= MAX_ARRAYS:
        raise LayoutError(f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
    if len(set(names)) != len(names):
        raise LayoutError("an array name appears twice")
    arrays, offset = {}, 0
    for name, dtype_text, shape_text in zip(names, dtypes, shapes, strict=True):
        dtype, shape = _dtype(name, dtype_text), _shape(name, shape_text)
        size = math.prod(shape) * dtype.itemsize
        if offset + size > data.size:
            raise LayoutError(f"array '{name}' runs past the packed bytes ({data.size})")
        value = data[offset : offset + size].view(dtype).reshape(shape)
        arrays[name] = Array(value.copy())
        offset += size
    if offset != data.size:
        raise LayoutError(f"{data.size - offset} packed bytes are not in the layout")
    return ArrayRecord(arrays)


def pack_content(content: RecordDict) -> RecordDict:
    """A copy of a message's content with its model arrays packed (or `content` itself when
    there is nothing to pack)."""
    arrays = content.array_records.get(Record.ARRAYS)
    packed = pack(arrays) if arrays is not None and len(arrays) > 1 else None
    if packed is None:
        return content
    copy = RecordDict(dict(content.items()))
    copy[Record.ARRAYS], copy[Record.LAYOUT] = packed
    return copy


def unpack_content(content: RecordDict) -> RecordDict:
    """A copy of a message's content with its model arrays unpacked (or `content` itself
    when they were not packed); LayoutError if the packing is malformed."""
    layout = content.config_records.get(Record.LAYOUT)
    if layout is None:
        return content
    packed = content.array_records.get(Record.ARRAYS)
    if packed is None:
        raise LayoutError(f"a layout record without an '{Record.ARRAYS}' record")
    copy = RecordDict({k: v for k, v in content.items() if k != Record.LAYOUT})
    copy[Record.ARRAYS] = unpack(packed, layout)
    return copy


def _strings(layout: ConfigRecord, key: str) -> list[str]:
    values = layout.get(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise LayoutError(f"layout '{key}' is not a list of strings")
    return values


def _dtype(name: str, text: str) -> np.dtype:
    try:
        dtype = np.dtype(text)
    except TypeError as error:
        raise LayoutError(f"array '{name}': dtype {text!r} unknown") from error
    if dtype.kind not in NUMERIC_KINDS or dtype.itemsize > 8:
        raise LayoutError(f"array '{name}': dtype {text!r} is not a plain number")
    return dtype


def _shape(name: str, text: str) -> tuple[int, ...]:
    parts = text.split("x") if text else []
    if not all(p.isascii() and p.isdigit() and len(p) <= 12 for p in parts):
        raise LayoutError(f"array '{name}': shape {text!r} is not dimensions joined by 'x'")
    return tuple(int(p) for p in parts)
