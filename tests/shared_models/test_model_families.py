"""Backbones, bone-age regression, 3D segmentation metrics, transfer learning and freezing."""

import pytest
import torch

from medfed.shared_models.pretrained import PretrainedError, load_pretrained
from medfed.shared_models.task_descriptions import BACKBONES
from medfed.shared_models.tasks import TASKS
from tests.conftest import tiny_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("model", BACKBONES)
def test_every_backbone_builds_offline_for_both_tasks(model):
    for task, outputs in (("classification", 3), ("regression", 1)):
        cfg = tiny_config(task=task, model=model, image_size=32)
        net = TASKS[task].build_network(cfg).eval()
        assert net(torch.zeros(2, 1, 32, 32)).shape == (2, outputs)


def test_regression_metrics_match_hand_computation():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[10.0], [20.0], [40.0]])

    cfg = tiny_config(task="regression")
    batch = {"image": torch.zeros(3, 1, 8, 8), "label": torch.tensor([12.0, 20.0, 34.0])}
    m = TASKS["regression"].evaluate(Fixed(), [batch], cfg, CPU)
    assert m["mae"] == pytest.approx((2 + 0 + 6) / 3)
    assert m["rmse"] == pytest.approx(((4 + 0 + 36) / 3) ** 0.5)


def test_regression_learns_on_a_tiny_batch():
    torch.manual_seed(0)
    cfg = tiny_config(task="regression", lr=0.01, local_epochs=30)
    images = torch.rand(8, 1, 32, 32)
    batch = {"image": images, "label": images.mean(dim=(1, 2, 3)) * 200}
    task = TASKS["regression"]
    net = task.build_network(cfg)
    before = task.evaluate(net, [batch], cfg, CPU)["mae"]
    task.train(net, [batch], cfg, CPU)
    assert task.evaluate(net, [batch], cfg, CPU)["mae"] < 0.5 * before


def _save(net, path):
    torch.save(net.state_dict(), path)
    return path


def test_partial_loading_reports_skipped_keys(tmp_path):
    torch.manual_seed(0)
    source = TASKS["classification"].build_network(tiny_config(task="classification"))
    path = _save(source, tmp_path / "classifier.pt")
    target = TASKS["regression"].build_network(tiny_config(task="regression"))
    report = load_pretrained(target, path)
    assert report.skipped and all(k.startswith("final.") for k in report.skipped)
    assert "shape (3," in next(iter(report.skipped.values()))
    assert report.loaded and not any(k.startswith("final.") for k in report.loaded)
    for key in report.loaded:
        assert torch.equal(target.state_dict()[key], source.state_dict()[key])
    assert "skipped final." in "\n".join(report.summary())


def test_monai_bundle_and_medfed_run_layouts_and_prefixes(tmp_path):
    net = TASKS["classification"].build_network(tiny_config(task="classification"))
    bundle = tmp_path / "bundle" / "models"
    bundle.mkdir(parents=True)
    torch.save(
        {"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, bundle / "model.pt"
    )
    fresh = TASKS["classification"].build_network(tiny_config(task="classification"))
    assert not load_pretrained(fresh, tmp_path / "bundle").skipped
    run = tmp_path / "run"
    run.mkdir()
    _save(net, run / "global_model.pt")
    assert len(load_pretrained(fresh, run).loaded) == len(net.state_dict())


def test_nothing_matching_is_a_clear_error(tmp_path):
    seg = TASKS["segmentation"].build_network(tiny_config())
    path = _save(seg, tmp_path / "unet.pt")
    cls = TASKS["classification"].build_network(tiny_config(task="classification"))
    with pytest.raises(PretrainedError, match="no tensor matches the model by name and shape"):
        load_pretrained(cls, path)
    with pytest.raises(PretrainedError, match="do not exist"):
        load_pretrained(cls, tmp_path / "missing.pt")


def test_freeze_backbone_trains_the_head_only():
    torch.manual_seed(0)
    cfg = tiny_config(task="classification", freeze="backbone", lr=0.05, local_epochs=3)
    task = TASKS["classification"]
    net = task.build_network(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = {"image": torch.randn(8, 1, 32, 32), "label": torch.arange(8) % 3}
    task.train(net, [batch], cfg, CPU)
    for key, value in net.state_dict().items():
        if "weight" not in key and "bias" not in key:
            continue
        changed = not torch.equal(value, before[key])
        assert changed == key.startswith("final."), key


def test_segmentation3d_metrics_match_hand_computation():
    cfg = tiny_config(task="segmentation3d", image_size=16, model_depth=1)
    label = torch.zeros(1, 1, 16, 16, 16)
    label[0, 0, 2:4, 2:4, 2:4] = 2  # an edema cube
    predicted = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    predicted[0, 2:4, 2:4, 2:4] = 2
    predicted[0, 12, 12, 12] = 3  # one false-positive enhancing voxel; no ground truth for it
    logits = torch.nn.functional.one_hot(predicted, 4).permute(0, 4, 1, 2, 3).float() * 10

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    m = TASKS["segmentation3d"].evaluate(
        Fixed(), [{"image": torch.zeros(1, 4, 16, 16, 16), "label": label}], cfg, CPU
    )
    assert m["dice-edema"] == pytest.approx(1.0) and m["hd95-edema"] == pytest.approx(0.0)
    assert m["dice-necrotic-core"] == pytest.approx(1.0)  # empty and predicted empty
    assert m["hd95-necrotic-core"] == 0.0
    assert m["dice-enhancing"] == 0.0
    assert m["hd95-enhancing"] == pytest.approx((3 * 16**2) ** 0.5)  # worst: the diagonal
