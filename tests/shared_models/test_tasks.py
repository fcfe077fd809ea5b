import pytest
import torch

from medfed.shared_models.tasks import TASKS
from medfed.shared_models.tasks.classification import macro_auc
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def _seg_batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, 1, size, size)
    labels[:, :, 8:20, 8:20] = 1
    labels[:, :, 11:17, 11:17] = 2
    images = labels / 2 + 0.1 * torch.randn(n, 1, size, size, generator=g)
    return {"image": images, "label": labels}


def _cls_batch(n=12, size=32):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = 0.1 * torch.randn(n, 1, size, size, generator=g)
    images[:, 0, :8, :8] += labels.view(-1, 1, 1).float()
    return {"image": images, "label": labels}


@pytest.mark.parametrize(
    ("task", "model", "lr", "batch", "out_shape"),
    [
        ("segmentation", "unet", 0.01, _seg_batch, (4, 3, 32, 32)),
        ("classification", "smallcnn", 0.01, _cls_batch, (12, 3)),
        ("classification", "densenet121", 0.001, _cls_batch, (12, 3)),
    ],
)
def test_network_shapes_and_loss_decreases(task, model, lr, batch, out_shape):
    torch.manual_seed(0)
    cfg = tiny_config(task=task, model=model, lr=lr, local_epochs=15)
    t = TASKS[task]
    net = t.build_network(cfg)
    data = batch()
    assert net(data["image"]).shape == out_shape
    before = t.evaluate(net, [data], cfg, CPU)["loss"]
    t.train(net, [data], cfg, CPU)
    after = t.evaluate(net, [data], cfg, CPU)["loss"]
    assert after < 0.8 * before


def test_fedprox_term_keeps_weights_near_the_global_model():
    cfg = tiny_config(task="classification", lr=0.05, local_epochs=10)
    t = TASKS["classification"]
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        net = t.build_network(cfg)
        start = [p.detach().clone() for p in net.parameters()]
        t.train(net, [_cls_batch()], cfg, CPU, proximal_mu=mu)
        drift[mu] = sum(
            float((p.detach() - s).pow(2).sum())
            for p, s in zip(net.parameters(), start, strict=True)
        )
    assert drift[10.0] < drift[0.0]


class _Fixed(torch.nn.Module):
    """Returns given logits, to check metrics against hand-computed values."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_dice_matches_hand_computation():
    cfg = tiny_config()
    label = torch.zeros(1, 1, 4, 4)
    label[0, 0, :2, :2] = 1  # 4 edema pixels
    label[0, 0, 3, 3] = 2  # 1 tumour pixel
    predicted = torch.zeros(1, 4, 4, dtype=torch.long)
    predicted[0, :2, :1] = 1  # 2 edema pixels, both right
    predicted[0, 3, 2:] = 2  # 2 tumour pixels, one right
    logits = torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 10
    metrics = TASKS["segmentation"].evaluate(
        _Fixed(logits), [{"image": torch.zeros(1, 1, 4, 4), "label": label}], cfg, CPU
    )
    assert metrics["dice-edema"] == pytest.approx(2 * 2 / (4 + 2))
    assert metrics["dice-tumour"] == pytest.approx(2 * 1 / (1 + 2))
    assert metrics["dice"] == pytest.approx((4 / 6 + 2 / 3) / 2)


def test_classification_metrics_match_hand_computation():
    cfg = tiny_config(task="classification")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    logits = torch.nn.functional.one_hot(predicted, 3).float() * 5
    m = TASKS["classification"].evaluate(
        _Fixed(logits), [{"image": torch.zeros(7, 1, 4, 4), "label": labels}], cfg, CPU
    )
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision-normal"] == pytest.approx(1 / 2)
    assert m["recall-normal"] == pytest.approx(1 / 2)
    assert m["precision-pneumonia"] == pytest.approx(2 / 3)
    assert m["recall-pneumonia"] == pytest.approx(1.0)
    assert m["precision-covid"] == pytest.approx(1.0)
    assert m["recall-covid"] == pytest.approx(2 / 3)


def test_macro_auc_perfect_and_reversed_and_missing_class():
    labels_1h = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1]), 3)
    perfect = labels_1h.float()
    assert macro_auc(perfect, labels_1h) == pytest.approx(1.0)  # class 2 absent: skipped
    assert macro_auc(1 - perfect, labels_1h) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("tstr", "said"),
    [(0.22, "does no better than guessing"), (0.40, "does no better than guessing"),
     (0.81, "tells the real classes apart better than guessing")],
)  # fmt: skip
def test_a_gan_run_says_whether_its_samples_teach_a_classifier(tstr, said):
    """Issue 25: TSTR 0.22 for three classes (chance 0.33) was printed as a bare number."""
    cfg = tiny_config(task="gan")
    outcome = TASKS["gan"].outcome({"tstr-accuracy": tstr, "fid": 0.3}, cfg)
    assert f"TSTR accuracy {tstr:.2f}, chance 0.33" in outcome and said in outcome


def test_a_headline_that_speaks_for_itself_gets_no_outcome_line():
    cfg = tiny_config(task="classification")
    assert TASKS["classification"].outcome({"auc": 0.9}, cfg) is None
