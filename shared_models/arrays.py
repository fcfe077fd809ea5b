"""Reading a Flower `Array` sent by another party, without trusting it.

Kept free of torch: the SecAgg+ steps of a deployed hospital run in a fresh
ClientApp process per message and import only NumPy and `cryptography`.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType

# The .npy header readers by format version (Flower writes version 1.0).
NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def readable(array: Array) -> np.ndarray | None:
    """The array's values, or None when its bytes are not one plain .npy array (a broken
    or hostile sender): a reply is checked before use, never trusted to parse.

    Its header is read first: NumPy's own loader allocates whatever shape a
    header declares before it reads the data, so 100 bytes declaring 3·10⁹
    floats cost the coordinator 24 GB (or a MemoryError). Here the declared
    size must be exactly the bytes that follow; objects, zip and pickle
    payloads are refused.
    """
    if array.stype != SType.NUMPY:
        return None
    handle = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(handle)
        if version not in NPY_HEADERS:
            return None
        shape, fortran_order, dtype = NPY_HEADERS[version](handle)
    except (ValueError, TypeError, EOFError, OSError, SyntaxError):
        return None
    count = math.prod(shape)
    if (
        dtype.hasobject
        or dtype.itemsize == 0
        or count * dtype.itemsize != len(array.data) - handle.tell()  # getbuffer() copies
    ):
        return None
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=handle.tell())
    return values.reshape(shape, order="F" if fortran_order else "C")
