"""`medfed export`: a MONAI bundle that runs without medfed and agrees with `medfed predict`,
and TorchScript that computes what the network computes."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from medfed.server.cli import main
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.run_folder import load_global_model
from medfed.shared_models.weights import norm_keys
from tests.bundles import write_bundle
from tests.trained_models import bundle_run, trained_run, untrained_run

OBLIQUE = np.array([[0, -1.5, 0, 10], [0, 0, 2.5, -5], [0.8, 0, 0, 3], [0, 0, 0, 1.0]])


def run_bundle(bundle: Path, images: Path, out: Path, tmp_path: Path) -> None:
    """`python -m monai.bundle run` in the bundle folder, where importing medfed fails."""
    shadow = tmp_path / "shadow" / "medfed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the bundle must not need medfed')\n")
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(images), "--output_dir", str(out)],
        cwd=bundle, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shadow.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_segmentation_bundle_writes_predicts_masks(tmp_path):
    run = trained_run(tmp_path, "segmentation3d", epochs=30, images=16,
                      **{"image-size": 32, "model-width": 8, "model-depth": 2})  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    site = tmp_path / "data" / "site-0"
    with_lesion = [p for p in sorted((site / "imagesTr").iterdir())
                   if np.asarray(nib.load(site / "labelsTr" / p.name).dataobj).any()]  # fmt: skip
    for path in with_lesion[-2:]:
        volume = nib.load(path).get_fdata().astype(np.float32)[:, 3:, :27]  # 32 x 29 x 27
        nib.save(nib.Nifti1Image(volume, OBLIQUE), images / path.name)
    assert main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 0
    assert main(["predict", "--model", str(run), "--input", str(images),
                 "--out", str(tmp_path / "predicted")]) == 0  # fmt: skip
    run_bundle(tmp_path / "bundle", images, tmp_path / "bundled", tmp_path)
    for path in sorted(images.iterdir()):
        name = path.name.removesuffix(".nii.gz")
        ours = nib.load(tmp_path / "predicted" / "masks" / path.name)
        theirs = nib.load(tmp_path / "bundled" / f"{name}_seg.nii.gz")
        assert theirs.shape == ours.shape == (32, 29, 27)
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)
        mask = np.asarray(ours.dataobj)
        assert mask.any()
        assert np.abs(np.asarray(theirs.dataobj).astype(int) - mask).max() == 0


def test_classification_bundle_gives_predicts_probabilities(tmp_path):
    cfg, run = untrained_run(tmp_path / "run", task="classification",
                             **{"image-size": 32, "model-depth": 2})  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(images / f"x{k}.png")
    (images / "README.txt").write_text("exported from PACS")  # stopped the bundle's whole run
    assert main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 0
    assert main(["predict", "--model", str(run), "--input", str(images),
                 "--out", str(tmp_path / "predicted")]) == 0  # fmt: skip
    run_bundle(tmp_path / "bundle", images, tmp_path / "bundled", tmp_path)
    with (tmp_path / "predicted" / "predictions.csv").open() as handle:
        ours = {Path(r["input"]).name: [float(r[f"probability-{c}"]) for c in cfg.classes]
                for r in csv.DictReader(handle)}  # fmt: skip
    with (tmp_path / "bundled" / "predictions.csv").open() as handle:
        theirs = {Path(row[0]).name: [float(v) for v in row[1:]] for row in csv.reader(handle)}
    assert set(theirs) == set(ours) == {f"x{k}.png" for k in range(4)}
    for name, probabilities in ours.items():
        assert np.abs(np.array(theirs[name]) - probabilities).max() < 1e-5


def test_bundle_metadata_names_the_network_and_the_run(tmp_path):
    cfg, run = untrained_run(tmp_path / "run", task="segmentation",
                             **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    assert main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 0
    configs = tmp_path / "bundle" / "configs"
    metadata = json.loads((configs / "metadata.json").read_text())
    digest = hashlib.sha256((run / "global_model.pt").read_bytes()).hexdigest()
    assert metadata["medfed"]["model-sha256"] == digest
    outputs = metadata["network_data_format"]["outputs"]["pred"]
    assert outputs["channel_def"] == {str(i): c for i, c in enumerate(cfg.classes)}
    network = json.loads((configs / "inference.json").read_text())["network_def"]
    assert network["_target_"] == "monai.networks.nets.UNet"
    assert (tmp_path / "bundle" / "models" / "model.pt").read_bytes() == (
        run / "global_model.pt"
    ).read_bytes()


def test_torchscript_computes_what_the_network_computes(tmp_path):
    cfg, run = untrained_run(tmp_path / "run", task="segmentation",
                             **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    extra = {"medfed.json": ""}
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.ts"), _extra_files=extra)
    _, net = load_global_model(run)
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert (scripted(images) - net(images)).abs().max() < 1e-5
    described = json.loads(extra["medfed.json"])
    assert described["config"] == cfg.to_mapping()
    assert described["preprocessing"][0]["_target_"] == "monai.transforms.LoadImaged"


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="segmentation",
                           **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("a hospital's file")
    assert main(["export", str(run), "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "a hospital's file"
    _, gan = untrained_run(tmp_path / "gan", task="gan", **{"image-size": 32, "model-depth": 2})
    assert main(["export", str(gan), "--out", str(tmp_path / "g")]) == 2
    assert "gan" in capsys.readouterr().err


def test_a_federated_bundle_goes_back_out_as_that_bundle(tmp_path, capsys):
    source = write_bundle(tmp_path / "bundle")
    run = bundle_run(tmp_path / "run", source, Bundle(source).network())
    out = tmp_path / "exported"  # the bundle named: tests/client/test_run_bundle.py has the rest
    assert main(["export", str(run), "--out", str(out), "--bundle", str(source)]) == 0
    assert (out / "models" / "model.pt").read_bytes() == (run / "global_model.pt").read_bytes()
    assert (out / "configs" / "train.json").read_bytes() == (
        source / "configs" / "train.json"
    ).read_bytes()
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    assert metadata["medfed"]["config"]["bundle"] == str(source)
    net = Bundle(out).network()
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "t")]) == 2
    assert "--format bundle only" in capsys.readouterr().err
    assert main(["predict", "--model", str(run), "--input", str(tmp_path),
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    assert "its bundle's own inference config" in capsys.readouterr().err


def test_export_of_a_fedbn_run_warns_that_its_normalisation_is_not_a_hospitals(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="segmentation", strategy="fedbn", norm="batch",
                           **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    out = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(out)]) == 0
    warning = json.loads((out / "configs" / "metadata.json").read_text())["medfed"]["warning"]
    assert "fedbn" in warning and "normalisation" in warning
    assert warning in capsys.readouterr().err
    assert "fedbn" in (out / "docs" / "README.md").read_text()


def test_export_refuses_an_out_that_is_a_file(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="classification",
                           **{"image-size": 32, "model-depth": 2})  # fmt: skip
    taken = tmp_path / "taken"
    taken.write_text("a hospital's file")
    assert main(["export", str(run), "--out", str(taken)]) == 2
    assert f"--out {taken}" in capsys.readouterr().err
    assert taken.read_text() == "a hospital's file"


def test_export_refuses_a_modality_the_run_did_not_train_with(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="segmentation", modality="MR",
                           **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    out = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(out), "--modality", "CT"]) == 2
    err = capsys.readouterr().err
    assert "--modality CT" in err and "'modality'" in err and "MR" in err
    assert not out.exists()
    assert main(["export", str(run), "--out", str(out), "--modality", "mr"]) == 0


def test_a_hospitals_fedbn_layers_export_as_its_own_model(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="segmentation", strategy="fedbn", norm="batch",
                           **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    _, net = load_global_model(run)
    generator = torch.Generator().manual_seed(5)
    kept = {k: v + torch.rand(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in net.state_dict().items() if k in set(norm_keys(net))}  # fmt: skip
    layers = tmp_path / "run-3.pt"
    torch.save(kept, layers)
    net.load_state_dict(kept, strict=False)  # the hospital's whole model
    out = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(out), "--site-layers", str(layers)]) == 0
    exported = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in net.state_dict().items())
    medfed = json.loads((out / "configs" / "metadata.json").read_text())["medfed"]
    assert "warning" not in medfed
    assert medfed["site-layers"] == {
        "file": "run-3.pt",
        "sha256": hashlib.sha256(layers.read_bytes()).hexdigest(),
    }
    assert "warning" not in capsys.readouterr().err
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts"),
                 "--site-layers", str(layers)]) == 0  # fmt: skip
    extra = {"medfed.json": ""}
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.ts"), _extra_files=extra)
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert (scripted(images) - net.eval()(images)).abs().max() < 1e-5
    assert "warning" not in json.loads(extra["medfed.json"])
