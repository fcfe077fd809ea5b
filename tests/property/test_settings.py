"""NodeSettings.from_mapping: any node config parses or raises NodeConfigError."""

from hypothesis import given
from hypothesis import strategies as st

from medfed.client.settings import NodeConfigError, NodeSettings
from medfed.shared_models.protocol import NodeConfig
from tests.property.strategies import FAST, anything

KEYS = [v for k, v in vars(NodeConfig).items() if k.isupper()]


@FAST
@given(values=st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), anything))
def test_any_node_config_parses_or_names_its_fault(values):
    try:
        settings = NodeSettings.from_mapping(values)
    except NodeConfigError as err:
        assert str(err)
        return
    assert settings.min_count >= 1
    if settings.partition is not None:
        index, count = settings.partition
        assert 0 <= index < count
