"""`medfed predict`: results in each input's own geometry, DICOM SEG, tables, skipped inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from scipy import ndimage

from medfed.client.synthetic.dicom import write_dicom
from medfed.server.cli import main
from medfed.shared_models.run_folder import load_global_model
from medfed.shared_models.weights import norm_keys
from tests.client.data.test_hostile_images import _nifti_header_only
from tests.dicom_series import write_series
from tests.trained_models import trained_run, untrained_run, write_run

# Voxel axes permuted and flipped, anisotropic spacing (0.8, 1.5, 2.5 mm), an offset.
SPACING = (0.8, 1.5, 2.5)
OBLIQUE = np.array([[0, -1.5, 0, 10], [0, 0, 2.5, -5], [0.8, 0, 0, 3], [0, 0, 0, 1.0]])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def brain3d_run(root: Path, channels: int) -> Path:
    """A 3D U-Net trained on one synthetic site (4 MRI channels, or their grey mean)."""
    config = {"image-size": 32, "model-width": 8, "model-depth": 2, "in-channels": channels}
    trained_run(root, "segmentation3d", epochs=40, images=20, **config)
    return root


@pytest.fixture(scope="module")
def brain3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return brain3d_run(tmp_path_factory.mktemp("brain3d"), channels=4)


def held_out_cases(root: Path, count: int = 3) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(image, whole-lesion mask, name) of the site's last cases, resampled from 1 mm to
    (0.8, 1.5, 2.5) mm voxels: the same anatomy on a 40 x 21 x 13 grid."""
    site = root / "data" / "site-0"
    entries = json.loads((site / "dataset.json").read_text())["training"][-count:]
    zoom = [1 / s for s in SPACING]
    cases = []
    for entry in entries:
        image = nib.load(site / entry["image"]).get_fdata().astype(np.float32)
        lesion = np.asarray(nib.load(site / entry["label"]).dataobj) > 0
        image = ndimage.zoom(image, [*zoom, 1], order=1)
        cases.append((image, ndimage.zoom(lesion, zoom, order=0), Path(entry["image"]).name))
    return cases


def test_mask_has_the_input_geometry_and_finds_the_lesion(brain3d, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = held_out_cases(brain3d)
    for image, _, name in cases:
        nib.save(nib.Nifti1Image(image, OBLIQUE), inputs / name)
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    whole = (inputs / cases[0][2]).read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    argv = ["predict", "--model", str(brain3d / "run"), "--input", str(inputs),
            str(tmp_path / "missing.nii.gz"), "--out", str(out), "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    for image, lesion, name in cases:
        mask = nib.load(out / "masks" / name)
        assert mask.shape == image.shape[:3] == (40, 21, 13)
        np.testing.assert_allclose(mask.affine, OBLIQUE, atol=1e-6)
        assert dice(np.asarray(mask.dataobj) > 0, lesion) > 0.7, name
        assert (out / "overlays" / name.replace(".nii.gz", ".png")).is_file()
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary["written"]) == len(cases)
    skipped = {Path(s["input"]).name: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"broken.nii.gz", "truncated.nii.gz", "missing.nii.gz"}
    assert skipped["missing.nii.gz"] == "no such file or folder"
    # in `medfed data check`'s words, not MONAI's "cannot find a suitable reader" (issue 25)
    assert skipped["broken.nii.gz"] == "corrupt or truncated NIfTI file"
    assert skipped["truncated.nii.gz"] == "corrupt or truncated NIfTI file"


def test_dicom_series_gets_a_seg_referencing_its_instances(tmp_path):
    grey = brain3d_run(tmp_path / "grey", channels=1)
    image = held_out_cases(grey, count=1)[0][0].mean(axis=-1)
    # slices along the third voxel axis, rows along the second, columns along the first
    stored = (np.transpose(image, (2, 1, 0)) * 1000).astype(np.int16)
    series = write_series(tmp_path / "series", stored, "MR", (1.5, 0.8, 2.5))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(grey / "run"), "--input", str(series),
                 "--out", str(out)]) == 0  # fmt: skip
    seg = hd.seg.segread(out / "seg" / "series.dcm")
    sources = sorted((pydicom.dcmread(p) for p in series.iterdir()), key=lambda d: d.InstanceNumber)
    uids = [d.SOPInstanceUID for d in sources]
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced) == sorted(uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["necrotic-core", "edema", "enhancing"]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    mask = nib.load(out / "masks" / "series.nii.gz")
    assert mask.shape == (40, 21, 13)
    volume = np.asarray(mask.dataobj)
    assert volume.any()  # each instance's frame is the mask's slice through it
    np.testing.assert_array_equal(frames, np.transpose(volume, (2, 1, 0)))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_image_level_results_are_one_row_per_image(tmp_path, task):
    cfg, run = untrained_run(tmp_path / "run", task=task, **{"image-size": 32, "model-depth": 2})
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(inputs / f"x{k}.png")
    (inputs / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _nifti_header_only(inputs / "huge.nii", (32767, 32767))  # 4 GiB decoded; no pixels
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--out", str(out)]) == 0
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(r["input"]).name for r in rows) == [f"x{k}.png" for k in range(5)]
    for row in rows:
        if task == "regression":
            assert row["quantity"] == cfg.classes[0]
            assert np.isfinite(float(row["value"]))
            continue
        probabilities = [float(row[f"probability-{name}"]) for name in cfg.classes]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == cfg.classes[int(np.argmax(probabilities))]
    skipped = json.loads((out / "predictions.json").read_text())["skipped"]
    reasons = {Path(s["input"]).name: s["reason"] for s in skipped}
    assert set(reasons) == {"huge.nii", "truncated.png"}
    assert "max-image-megabytes" in reasons["huge.nii"]


def test_a_site_folder_is_read_through_its_manifest(tmp_path, seg_sites):
    _, run = untrained_run(tmp_path / "run", task="segmentation", **{"image-size": 32,
                           "model-width": 4, "model-depth": 2})  # fmt: skip
    site = seg_sites / "site-0"
    listed = json.loads((site / "dataset.json").read_text())["training"]
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(site), "--out", str(out)]) == 0
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks == sorted(f"imagesTr__{Path(e['image']).name.split('.')[0]}.nii.gz"
                           for e in listed)  # fmt: skip
    first = listed[0]["image"]
    source = nib.load(site / first) if first.endswith((".nii", ".nii.gz")) else None
    if source is not None:
        mask = nib.load(out / "masks" / f"imagesTr__{Path(first).name.split('.')[0]}.nii.gz")
        assert mask.shape == source.shape


def test_refuses_what_is_not_a_run_or_cannot_predict(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path), "--input", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "no model.json" in capsys.readouterr().err
    _, gan = untrained_run(tmp_path / "gan", task="gan", **{"image-size": 32, "model-depth": 2})
    assert main(["predict", "--model", str(gan), "--input", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "medfed gan sample" in capsys.readouterr().err


def test_a_single_dicom_image_gets_a_seg_of_its_own_frame(tmp_path):
    _, run = untrained_run(tmp_path / "run", task="segmentation",
                           **{"image-size": 32, "model-width": 4, "model-depth": 2})  # fmt: skip
    rng = np.random.default_rng(2)
    path = write_dicom(tmp_path / "xray.dcm", rng.integers(0, 4000, (48, 40)).astype(np.uint16),
                       "DX", (0.5, 0.7), uid_seed="one-image")  # fmt: skip
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(path), "--out", str(out)]) == 0
    seg = hd.seg.segread(out / "seg" / "xray.dcm")
    source = pydicom.dcmread(path)
    frames = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
    mask = np.asarray(nib.load(out / "masks" / "xray.nii.gz").dataobj)
    assert mask.shape == (40, 48)  # MONAI's (columns, rows) order, with the DICOM's affine
    assert len(np.unique(mask)) > 1  # an untrained network: some pixels of some class
    np.testing.assert_array_equal(frames[0], mask.T)


class Planted:
    """A pickle that runs code when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_model_file_that_carries_code_is_refused_unrun(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="classification",
                           **{"image-size": 32, "model-depth": 2})  # fmt: skip
    marker = tmp_path / "marker"
    torch.save({"final.weight": Planted(marker)}, run / "global_model.pt")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    assert main(["predict", "--model", str(run), "--input", str(image),
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "global_model.pt: not a state dict of tensors" in capsys.readouterr().err
    assert not marker.exists()


# --- inputs as a hospital's folders hold them (review: each failed on the first version) ---

SEG2D = {"image-size": 32, "model-width": 4, "model-depth": 2}


def summary_of(out: Path) -> tuple[list[str], dict[str, str]]:
    """(names written, {input file name: reason}) from predictions.json."""
    summary = json.loads((out / "predictions.json").read_text())
    skipped = {Path(s["input"]).name: s["reason"] for s in summary["skipped"]}
    return sorted(w["name"] for w in summary["written"]), skipped


def test_a_series_folder_with_a_stray_file_is_one_study(tmp_path):
    _, run = untrained_run(tmp_path / "run", task="segmentation3d", **{**SEG2D, "in-channels": 1})
    rng = np.random.default_rng(3)
    volume = rng.integers(-900, 900, (6, 24, 20)).astype(np.int16)
    series = write_series(tmp_path / "series", volume, "CT", (1.0, 1.2, 2.0))
    (series / "0-readme.txt").write_text("exported from PACS")  # sorts before the slices
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(series), "--out", str(out)]) == 0
    written, skipped = summary_of(out)
    assert written == ["series"]  # not six one-slice "volumes"
    assert set(skipped) == {"0-readme.txt"}
    assert nib.load(out / "masks" / "series.nii.gz").shape == (20, 24, 6)
    record = json.loads((out / "predictions.json").read_text())["written"][0]
    assert record["modality"] == "CT"  # the slices' tag, whatever file sorts first
    seg = hd.seg.segread(out / "seg" / "series.dcm")
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6


def test_a_folder_of_radiographs_is_a_study_per_image_and_two_series_are_not_mixed(tmp_path):
    _, run = untrained_run(tmp_path / "run", task="segmentation", **SEG2D)
    rng = np.random.default_rng(4)
    folder = tmp_path / "worklist"
    folder.mkdir()
    for k in range(3):  # each radiograph its own series, as modalities send them
        write_dicom(folder / f"xr{k}.dcm", rng.integers(0, 4000, (48, 40)).astype(np.uint16),
                    "DX", (0.5, 0.7), uid_seed=f"radiograph-{k}")  # fmt: skip
    for name, rows in (("a", 30), ("b", 36)):  # two series in one folder (no reader mixes them)
        series = write_series(tmp_path / name, np.zeros((3, rows, 30), np.int16), "MR", (1, 1, 1))
        for path in series.iterdir():
            path.rename(folder / f"{name}-{path.name}")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(folder), "--out", str(out)]) == 0
    written, skipped = summary_of(out)
    assert written == ["xr0", "xr1", "xr2"]
    assert all((out / "seg" / f"{name}.dcm").is_file() for name in written)
    assert len(skipped) == 2  # each multi-file series, with why it was not read
    assert all("series" in reason for reason in skipped.values())


def test_a_study_the_model_cannot_take_is_skipped_and_the_batch_goes_on(tmp_path):
    _, run = untrained_run(tmp_path / "run", task="segmentation", **SEG2D)
    rng = np.random.default_rng(5)
    inputs = tmp_path / "in"
    inputs.mkdir()
    grey = rng.integers(0, 255, (40, 36), dtype=np.uint8)
    Image.fromarray(grey).save(inputs / "a-grey.png")
    Image.fromarray(grey).convert("LA").save(inputs / "b-grey-alpha.png")  # 2 channels
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(inputs / "c-rgb.png")
    nib.save(nib.Nifti1Image(grey[..., None].astype(np.float32), np.eye(4)),
             inputs / "d-slice.nii.gz")  # a 2D slice stored as H x W x 1 # fmt: skip
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--out", str(out),
                 "--batch-size", "4"]) == 0  # fmt: skip
    written, skipped = summary_of(out)
    assert written == ["a-grey", "c-rgb", "d-slice"]
    assert set(skipped) == {"b-grey-alpha.png"}
    assert "2 channels" in skipped["b-grey-alpha.png"]
    assert nib.load(out / "masks" / "d-slice.nii.gz").shape == (40, 36, 1)


def test_a_projection_radiograph_gets_a_seg_and_one_that_cannot_still_gets_its_mask(tmp_path):
    _, run = untrained_run(tmp_path / "run", task="segmentation", **SEG2D)
    rng = np.random.default_rng(6)
    paths = {}
    for name in ("projection", "anonymous"):
        paths[name] = write_dicom(tmp_path / f"{name}.dcm", rng.integers(0, 4000, (48, 40)).astype(
            np.uint16), "DX", (0.5, 0.7), uid_seed=name)  # fmt: skip
    ds = pydicom.dcmread(paths["projection"])  # as X-ray modalities write them: no patient plane
    ds.ImagerPixelSpacing = ds.PixelSpacing
    del ds.PixelSpacing, ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(paths["projection"])
    ds = pydicom.dcmread(paths["anonymous"])  # a SEG must name the patient: none can be made
    del ds.PatientID
    ds.save_as(paths["anonymous"])
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", *map(str, paths.values()),
                 "--out", str(out)]) == 0  # fmt: skip
    records = {w["name"]: w for w in json.loads((out / "predictions.json").read_text())["written"]}
    assert set(records) == {"projection", "anonymous"}
    seg = hd.seg.segread(records["projection"]["dicom-seg"])
    uid = pydicom.dcmread(paths["projection"]).SOPInstanceUID
    frames = seg.get_pixels_by_source_instance([uid], combine_segments=True)
    np.testing.assert_array_equal(
        frames[0], np.asarray(nib.load(records["projection"]["mask"]).dataobj).T
    )
    assert Path(records["anonymous"]["mask"]).is_file()
    assert "dicom-seg" not in records["anonymous"]
    assert "PatientID" in records["anonymous"]["dicom-seg-not-written"]


def test_a_site_folder_given_relative_lists_its_refused_entries(tmp_path, seg_sites, monkeypatch):
    untrained_run(tmp_path / "run", task="segmentation", **SEG2D)
    site = tmp_path / "sites" / "site-0"
    shutil.copytree(seg_sites / "site-0", site)
    manifest = json.loads((site / "dataset.json").read_text())
    listed = len(manifest["training"])
    manifest["training"].append({"image": "../../run/model.json", "label": "labelsTr/x.nii.gz"})
    (site / "dataset.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", "run", "--input", "sites/site-0", "--out", "out"]) == 0
    written, skipped = summary_of(tmp_path / "out")
    assert len(written) == listed
    assert list(skipped.values()) == ["../../run/model.json points outside the site folder"]


def test_output_names_stay_unique(tmp_path):
    _, run = untrained_run(tmp_path / "run", task="segmentation", **SEG2D)
    rng = np.random.default_rng(7)
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "x-2.png"]
    for path in paths:
        path.parent.mkdir()
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    assert (
        main(["predict", "--model", str(run), "--input", *map(str, paths), "--out", str(out)]) == 0
    )
    records = json.loads((out / "predictions.json").read_text())["written"]
    masks = [r["mask"] for r in records]
    assert len(set(masks)) == 3
    assert all(Path(m).is_file() for m in masks)


def test_refuses_an_out_folder_holding_earlier_results(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="segmentation", **SEG2D)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(8).integers(0, 255, (40, 36), np.uint8)).save(image)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(run), "--input", str(image), "--out", str(out)]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    image.write_bytes(b"corrupted since")  # a stale mask would pass for this call's result
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_fedbn_model_is_used_with_a_warning(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="segmentation", strategy="fedbn",
                           norm="batch", **SEG2D)  # fmt: skip
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 36), np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(image), "--out", str(out)]) == 0
    warning = json.loads((out / "predictions.json").read_text())["warning"]
    assert "fedbn" in warning and "normalisation" in warning
    assert warning in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_one_error_line(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="classification",
                           **{"image-size": 32, "model-depth": 2})  # fmt: skip
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert main(["predict", "--model", str(run), "--input", str(image),
                 "--out", str(blocked / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("medfed: error: ") and str(blocked) in err
    assert len(err.strip().splitlines()) == 1


def test_a_hospitals_fedbn_layers_make_the_model_its_own(tmp_path, capsys):
    cfg, run = untrained_run(tmp_path / "run", task="classification", strategy="fedbn",
                             norm="batch", **{"image-size": 32, "model-depth": 2})  # fmt: skip
    _, net = load_global_model(run)
    norms = set(norm_keys(net))
    generator = torch.Generator().manual_seed(3)
    kept = {k: v.float() + torch.rand(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in net.state_dict().items() if k in norms}  # fmt: skip
    layers = tmp_path / "run-7.pt"
    torch.save(kept, layers)
    hospitals = write_run(tmp_path / "hospital", cfg, net)  # the hospital's whole model
    net.load_state_dict(kept, strict=False)
    torch.save(net.state_dict(), hospitals / "global_model.pt")
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(4)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(images / f"{k}.png")

    def probabilities(model: Path, out: str, *extra: str) -> list[list[str]]:
        assert main(["predict", "--model", str(model), "--input", str(images),
                     "--out", str(tmp_path / out), *extra]) == 0  # fmt: skip
        with (tmp_path / out / "predictions.csv").open() as handle:
            return [row[1:] for row in csv.reader(handle)]

    own = probabilities(run, "own", "--site-layers", str(layers))
    assert "warning" not in json.loads((tmp_path / "own" / "predictions.json").read_text())
    assert own == probabilities(hospitals, "whole")
    assert own != probabilities(run, "global")
    capsys.readouterr()
    torch.save({k: v[:1] if v.dim() else v for k, v in kept.items()}, layers)  # misfits
    assert main(["predict", "--model", str(run), "--input", str(images), "--out",
                 str(tmp_path / "bad"), "--site-layers", str(layers)]) == 2  # fmt: skip
    assert f"{layers}: its normalisation layers do not fit" in capsys.readouterr().err


def test_inputs_that_do_not_exist_leave_no_output_folder_behind(tmp_path, capsys):
    """Issue 25: such a call wrote predictions.json, and the corrected retry was refused
    ("a folder that is not empty")."""
    _, run = untrained_run(tmp_path / "run", task="classification", **{"image-size": 32})
    out = tmp_path / "predictions"
    args = ["predict", "--model", str(run), "--input", str(tmp_path / "new-studies"),
            "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    assert "new-studies: no such file or folder" in capsys.readouterr().err
    assert not out.exists()
