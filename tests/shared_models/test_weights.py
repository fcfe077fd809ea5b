import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import (
    exchanged_keys,
    incompatibilities,
    load_record,
    net_template,
    norm_keys,
    record_template,
    to_record,
)
from tests.conftest import tiny_config


def _densenet():
    cfg = tiny_config(task="classification", model="densenet121")
    return TASKS["classification"].build_network(cfg)


def test_round_trip_is_exact():
    torch.manual_seed(0)
    cfg = tiny_config()
    source = TASKS["segmentation"].build_network(cfg)
    target = TASKS["segmentation"].build_network(cfg)
    load_record(target, to_record(source))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_integer_buffers_are_not_exchanged():
    net = _densenet()
    counters = [k for k, v in net.state_dict().items() if not torch.is_floating_point(v)]
    assert counters and all(k.endswith("num_batches_tracked") for k in counters)
    record = to_record(net)
    assert not set(counters) & set(record.keys())
    assert list(record.keys()) == exchanged_keys(net)
    assert all(record[k].numpy().dtype == np.float32 for k in record)


@pytest.mark.parametrize(
    ("task", "overrides", "layer"),
    [
        ("classification", {"model": "densenet121"}, torch.nn.BatchNorm2d),
        ("classification", {"norm": "batch"}, torch.nn.BatchNorm2d),
        ("segmentation", {"norm": "batch"}, torch.nn.BatchNorm2d),
        ("segmentation3d", {"model": "segresnet", "model_width": 8}, torch.nn.GroupNorm),
    ],
)
def test_fedbn_keeps_every_normalisation_layer_and_nothing_else(task, overrides, layer):
    net = TASKS[task].build_network(tiny_config(task=task, **overrides))
    layers = {name for name, m in net.named_modules() if isinstance(m, layer)}
    local = set(norm_keys(net))
    assert layers and {k.rsplit(".", 1)[0] for k in local} == layers
    sent = set(to_record(net, local_norms=True).keys())
    assert sent == set(exchanged_keys(net)) - local
    assert set(net_template(net, local_norms=True)) == sent


def test_instance_norm_without_affine_has_nothing_to_keep():
    net = TASKS["segmentation"].build_network(tiny_config())
    assert norm_keys(net) == []


def test_incompatible_updates_are_named():
    net = TASKS["segmentation"].build_network(tiny_config())
    good = to_record(net)
    template = net_template(net)
    assert template == record_template(good)
    assert incompatibilities(good, template) == []
    key = next(iter(good.keys()))
    bad_shape = ArrayRecord({**good, key: Array(np.zeros((1, 2), np.float32))})
    assert any("shape" in p and key in p for p in incompatibilities(bad_shape, template))
    nan = good[key].numpy().copy()
    nan.flat[0] = np.nan
    assert any(
        "NaN" in p for p in incompatibilities(ArrayRecord({**good, key: Array(nan)}), template)
    )
    missing = ArrayRecord({k: v for k, v in good.items() if k != key})
    assert any("missing" in p for p in incompatibilities(missing, template))
    with pytest.raises(ValueError, match="do not fit"):
        load_record(net, missing)


@pytest.fixture
def server_process_identity():
    """Messages carry the run id that Flower sets in every ServerApp process."""
    previous = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous


@pytest.mark.usefixtures("server_process_identity")
def test_fedavg_equals_independent_weighted_mean():
    rng = np.random.default_rng(0)
    shapes = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,)}
    clients = [
        ({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, n)
        for n in (10, 30, 60)
    ]
    replies = [
        Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                    "metrics": MetricRecord({"train-loss": 1.0, "num-examples": n}),
                }
            ),
            dst_node_id=i + 1,
            message_type="train",
        )
        for i, (weights, n) in enumerate(clients)
    ]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    total = sum(n for _, n in clients)
    for key in shapes:
        expected = sum(w[key].astype(np.float64) * n for w, n in clients) / total
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
