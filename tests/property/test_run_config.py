"""RunConfig.from_mapping: any mapping parses or raises ConfigError, and what parses is in range."""

import math
from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st

from medfed.shared_models.config import (
    FLOAT_RANGES,
    INT_RANGES,
    ConfigError,
    RunConfig,
    config_key,
)
from tests.property.strategies import FAST, anything, scalars

KEYS = [config_key(f.name) for f in fields(RunConfig)]
run_configs = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), scalars | anything, max_size=6
)


@FAST
@given(values=run_configs)
def test_any_run_config_parses_or_names_its_fault(values):
    try:
        cfg = RunConfig.from_mapping(values)
    except ConfigError as err:
        assert str(err)
        return
    for attr, (low, high) in INT_RANGES.items():
        assert low <= getattr(cfg, attr) <= high, attr
    for attr, (low, high, _) in FLOAT_RANGES.items():
        assert math.isfinite(getattr(cfg, attr)) and low <= getattr(cfg, attr) <= high, attr
    assert cfg.image_size >= 16 and 0 <= cfg.patch_size <= cfg.image_size


@FAST
@given(values=run_configs)
def test_the_hospitals_light_reading_parses_or_names_its_fault(values):
    """validate=False (the SecAgg+ steps) still types every value."""
    try:
        RunConfig.from_mapping(values, validate=False)
    except ConfigError as err:
        assert str(err)
