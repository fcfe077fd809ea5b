"""Model arrays from the other end: `readable` and `incompatibilities` never raise.

The coordinator checks every update, the hospital every global model, with
these two: whatever the bytes, the answer is a list of problems (or None
for an unreadable array), never an exception that takes the round down.
"""

import numpy as np
from flwr.app import Array, ArrayRecord
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medfed.shared_models.arrays import readable
from medfed.shared_models.weights import incompatibilities
from tests.property.strategies import FAST, hostile_bytes

shapes = hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)
real_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.float16]),
    shape=shapes,
).map(Array)
forged_arrays = st.builds(
    lambda shape, stype, data: Array(dtype="float32", shape=shape, stype=stype, data=data),
    shapes,
    st.sampled_from(["numpy.ndarray", "torch.tensor", ""]),
    hostile_bytes,
)
arrays = st.one_of(real_arrays, forged_arrays)
records = st.dictionaries(st.sampled_from(["w", "b", "x"]), arrays, max_size=3).map(ArrayRecord)
templates = st.dictionaries(st.sampled_from(["w", "b"]), shapes.map(tuple), max_size=2)


@FAST
@given(array=arrays)
def test_readable_gives_an_array_or_none(array):
    values = readable(array)
    assert values is None or isinstance(values, np.ndarray)


@FAST
@given(record=records, template=templates)
def test_incompatibilities_are_a_list_of_reasons(record, template):
    problems = incompatibilities(record, template)
    assert all(isinstance(p, str) and p for p in problems)
    if not problems:
        assert all(np.isfinite(readable(record[k])).all() for k in template)
