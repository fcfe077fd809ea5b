"""Hypothesis strategies for what arrives from outside: config values, JSON, Flower records.

The property every parser must keep: any input either parses or raises the
module's own error type with a non-empty message, never another exception.
"""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Fast enough for every run of the suite: all property tests together take seconds. No
# example database: a failure prints its input, and the work tree stays clean.
FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

INT64 = st.integers(-(2**63), 2**63 - 1)
numbers_as_text = st.one_of(
    st.integers().map(str), st.floats().map(str), st.sampled_from(["1e400", "-0", "²", "٣", " 7 "])
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    numbers_as_text,
    st.binary(max_size=30),
)
anything = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(), scalars))

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

# What Flower lets a ConfigRecord hold: int, float, str, bytes, bool, or a list of one of them.
config_scalars = st.one_of(
    INT64, st.floats(), st.text(max_size=20), st.binary(max_size=40), st.booleans()
)
config_values = st.one_of(
    config_scalars,
    st.lists(INT64, max_size=4),
    st.lists(st.text(max_size=8), max_size=4),
    st.lists(st.binary(max_size=40), max_size=3),
)
# What a MetricRecord may hold: int (Flower takes any size in process), float, or a list.
big_integers = st.integers() | st.sampled_from([2**63, -(2**63) - 1, 10**400])
metric_values = st.one_of(
    big_integers,
    st.floats(),
    st.lists(big_integers, max_size=3),
    st.lists(st.floats(), max_size=3),
)


def _npy(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy header declaring `shape` of `descr`, and no data."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


# Bytes a hostile party may put in an Array: noise, a zip or pickle opening, or an .npy
# header declaring far more (or other) values than follow it.
hostile_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b),
    st.binary(max_size=64).map(lambda b: b"\x80\x04" + b),
    st.tuples(
        st.lists(st.integers(0, 10**12), max_size=3).map(tuple),
        st.sampled_from(["<f4", "<f8", "<i8", "|O", "<U4", "|V8"]),
        st.binary(max_size=16),
    ).map(lambda t: _npy(t[0], t[1]) + t[2]),
)


def records_or_reject(build, values):
    """Flower refuses some values in its records itself; those inputs never reach medfed."""
    from hypothesis import assume

    try:
        return build(values)
    except (TypeError, ValueError):
        assume(False)
        raise  # unreachable: assume(False) ends the example
