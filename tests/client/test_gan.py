"""A federated GAN at a site: augmentation of scarce classes, and sampling images."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from medfed.client.data.site import load_site
from medfed.client.gan_samples import apportion, generated_items, load_generator, sample_images
from medfed.server.run.run_record import RunRecord
from medfed.shared_models.run_folder import RunFolderError
from medfed.shared_models.tasks import TASKS
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A finished gan run folder with an (untrained) tiny generator."""
    out = tmp_path_factory.mktemp("gan-run")
    cfg = tiny_config(task="gan", image_size=32, model_width=4)
    torch.manual_seed(0)
    RunRecord(cfg, out).save_model(TASKS["gan"].build_network(cfg), cfg, 1)
    return out


def test_a_generator_loads_only_from_a_gan_run(gan_run, tmp_path):
    cfg, net = load_generator(gan_run)
    assert cfg.task == "gan" and not net.training
    other = tiny_config(task="classification")
    RunRecord(other, tmp_path).save_model(TASKS["classification"].build_network(other), other, 1)
    with pytest.raises(RunFolderError, match="is a 'classification' run, not a gan run"):
        load_generator(tmp_path)
    with pytest.raises(RunFolderError, match=r"no model\.json"):
        load_generator(tmp_path / "missing")


def test_augmentation_fills_the_sites_scarce_classes(gan_run, cls_sites):
    cfg = tiny_config(task="classification", gan_model=str(gan_run), gan_augment_ratio=1.0)
    site = load_site(cls_sites / "site-0", cfg)
    counts = Counter(int(e["label"]) for e in site.train)
    extra = generated_items(site, cfg, server_round=1)
    made = Counter(item["label"] for item in extra)
    assert len(extra) == len(site.train), "ratio 1: exactly, whatever the class balance"
    most = max(counts, key=counts.get)
    assert made.get(most, 0) == 0, "the site's most frequent class gets no generated images"
    scarcest = min(range(3), key=lambda c: counts.get(c, 0))
    assert made[scarcest] == max(made.values())
    assert extra[0]["image"].shape == (1, 32, 32)
    again = generated_items(site, cfg, server_round=1)
    assert torch.equal(extra[0]["image"], again[0]["image"]), "seeded by (seed, round)"


@pytest.mark.parametrize(
    ("total", "shares", "parts"),
    [(7, [0, 3, 3], [0, 4, 3]), (10, [0, 1, 2], [0, 3, 7]), (5, [0, 0, 0], [2, 2, 1])],
)
def test_generated_images_add_up_to_ratio_times_train(total, shares, parts):
    """The count a site reports is round(ratio x train), a function of a count it shows or
    hides; rounding each class's part would make it a clue to the class balance (and a
    balanced site would report 0)."""
    assert apportion(total, shares) == parts


def test_sample_writes_pngs_of_the_asked_class_and_a_grid(gan_run, tmp_path):
    paths = sample_images(gan_run, 3, "covid", tmp_path / "out", seed=2)
    assert [p.name for p in paths] == ["covid-0000.png", "covid-0001.png", "covid-0002.png"]
    assert Image.open(paths[0]).size == (32, 32)
    assert (tmp_path / "out" / "grid.png").is_file()
    with pytest.raises(ValueError, match=r"\(0 normal, 1 pneumonia, 2 covid\)"):
        sample_images(gan_run, 1, "tumour", tmp_path / "other")


def test_sample_takes_the_class_index_too(gan_run, tmp_path):
    by_index = sample_images(gan_run, 2, "1", tmp_path / "index", seed=3)
    by_name = sample_images(gan_run, 2, "pneumonia", tmp_path / "name", seed=3)
    assert [p.name for p in by_index] == ["pneumonia-0000.png", "pneumonia-0001.png"]
    for index, name in zip(by_index, by_name, strict=True):
        assert Image.open(index).tobytes() == Image.open(name).tobytes()


@pytest.mark.parametrize("given", ["3", "-1", "Covid", ""])
def test_an_unknown_class_lists_the_valid_ones_with_their_indices(gan_run, tmp_path, given):
    with pytest.raises(ValueError, match=r"not one of the gan's classes \(0 normal, 1 pneumonia"):
        sample_images(gan_run, 1, given, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gan_sample_command_takes_an_index_and_names_a_bad_one(gan_run, tmp_path, capsys):
    from medfed.server.cli import main

    out = tmp_path / "out"
    assert main(["gan", "sample", "--model", str(gan_run), "--class", "2", "--n", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    assert (out / "covid-0000.png").is_file()
    assert main(["gan", "sample", "--model", str(gan_run), "--class", "7",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--class '7': not one of the gan's classes (0 normal, 1 pneumonia, 2 covid)" in (
        capsys.readouterr().err
    )


def test_class_names_from_a_run_folder_never_name_a_path(tmp_path):
    """A handed-out run folder's model.json chooses the class names, which name the PNGs:
    '../x' and an absolute path wrote outside --out. Only letters, digits, '-' and '_' of a
    name reach a file name."""
    cfg = tiny_config(
        task="gan", image_size=32, model_width=4, class_names=f"../x,{tmp_path}/y,normal"
    )
    torch.manual_seed(0)
    RunRecord(cfg, tmp_path / "run").save_model(TASKS["gan"].build_network(cfg), cfg, 1)
    out = tmp_path / "nested" / "out"
    written = sample_images(tmp_path / "run", 1, "0", out) + sample_images(
        tmp_path / "run", 1, "1", out
    )
    assert all(path.parent == out for path in written)
    assert sorted(p.name for p in out.iterdir() if p.name != "grid.png") == sorted(
        p.name for p in written
    )
    assert not (tmp_path / "nested" / "x-0000.png").exists()
    assert not (tmp_path / "y-0000.png").exists()
