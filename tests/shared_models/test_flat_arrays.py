"""Model arrays packed into one array for the wire: exact round trips, malformed layouts
refused naming what is wrong, and far fewer objects per message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medfed.shared_models import flat_arrays
from medfed.shared_models.flat_arrays import LayoutError, pack, pack_content, unpack
from medfed.shared_models.protocol import Record

DTYPES = st.sampled_from(["<f4", "<f8", "<f2", "<i8", "<i4", "|u1", "|b1"])
ARRAYS = st.dictionaries(
    st.text("abcdefgh._", min_size=1, max_size=12),
    DTYPES.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_side=4))),
    min_size=1,
    max_size=8,
)


@given(ARRAYS)
def test_every_array_comes_back_with_its_name_dtype_shape_and_bytes(values):
    record = ArrayRecord({k: Array(v) for k, v in values.items()})
    packed, layout = pack(record)
    assert list(packed) == [flat_arrays.FLAT]
    back = unpack(packed, layout)
    assert list(back) == list(values)
    for name, value in values.items():
        got = back[name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == np.ascontiguousarray(value).tobytes()


def _model() -> ArrayRecord:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    return ArrayRecord(net.state_dict())


def test_a_message_of_many_arrays_travels_as_a_handful_of_objects():
    model = _model()
    content = RecordDict({Record.ARRAYS: model, Record.CONFIG: ConfigRecord({"r": 1})})
    packed = pack_content(content)
    assert len(get_all_nested_objects(packed)) <= 6 < len(get_all_nested_objects(content))
    assert content[Record.ARRAYS] is model and Record.LAYOUT not in content  # left as it was
    unpacked = flat_arrays.unpack_content(packed)
    assert Record.LAYOUT not in unpacked and Record.LAYOUT in packed
    for name, array in model.items():
        assert unpacked[Record.ARRAYS][name].numpy().tobytes() == array.numpy().tobytes()


def test_one_array_or_none_is_left_as_it_is():
    one = RecordDict({Record.ARRAYS: ArrayRecord({"masked": Array(np.zeros(3, np.int64))})})
    assert pack_content(one) is one
    assert pack_content(RecordDict({Record.CONFIG: ConfigRecord({"a": 1})})) is not None


def _layout(**changes) -> tuple[ArrayRecord, ConfigRecord]:
    packed, layout = pack(ArrayRecord({"w": Array(np.ones((2, 3), np.float32)),
                                       "b": Array(np.zeros(3, np.float32))}))  # fmt: skip
    for key, value in changes.items():
        layout[key] = value
    return packed, layout


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"shapes": ["2x3", "4"]}, "array 'b' runs past the packed bytes"),
        ({"shapes": ["2x3", "2"]}, "4 packed bytes are not in the layout"),
        ({"dtypes": ["<f4", "|O"]}, "array 'b': dtype '|O' is not a plain number"),
        ({"dtypes": ["<f4", "bogus"]}, "array 'b': dtype 'bogus' unknown"),
        ({"shapes": ["2x3", "-3"]}, "array 'b': shape '-3' is not dimensions"),
        ({"names": ["w", "w"]}, "an array name appears twice"),
        ({"names": ["w"]}, "1 names, 2 dtypes, 2 shapes"),
        ({"names": "w,b"}, "layout 'names' is not a list of strings"),
    ],
)
def test_a_layout_that_does_not_fit_its_bytes_is_refused_naming_why(changes, named):
    packed, layout = _layout(**changes)
    with pytest.raises(LayoutError, match=named):
        unpack(packed, layout)
