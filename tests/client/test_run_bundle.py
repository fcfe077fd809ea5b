"""Nothing from a run folder runs at a hospital: a task = bundle run's bundle (whose configs
are code) is used by `medfed export` only when the user names it (`--bundle`, hashing as
the run recorded) or when the run folder's own copy is approved at this site; `medfed
predict` never builds it. Every bundle here plants a `$` expression that writes a marker
file when MONAI evaluates it, so "never ran" is a file that does not exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medfed.client import approval
from medfed.server.cli import main
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.run_folder import RunFolderError, load_global_model
from tests.audit_log import read_audit
from tests.bundles import train_config, write_bundle
from tests.trained_models import bundle_run, untrained_run


def planted_bundle(root: Path, marker: Path) -> Path:
    """The tests' bundle whose network_def writes `marker` when it is built (its
    spatial_dims is a `$` expression that writes the file, then gives 2)."""
    network = dict(train_config(0.01)["network_def"])
    network["spatial_dims"] = (
        f"$__import__('pathlib').Path({str(marker)!r}).write_text('ran') and 2"
    )
    return write_bundle(root, network_def=network)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "the-bundle-ran"


def bundle_weights(tmp_path: Path) -> torch.nn.Module:
    """The network of the tests' bundle (the planted one has the same layers)."""
    torch.manual_seed(0)
    return Bundle(write_bundle(tmp_path / "twin")).network()


def planted_run(tmp_path: Path, marker: Path, net: torch.nn.Module) -> tuple[Path, str]:
    """A finished bundle run of the planted bundle (outside the run folder, and copied
    inside it as the coordinator does); the bundle's hash."""
    source = planted_bundle(tmp_path / "elsewhere", marker)
    run = bundle_run(tmp_path / "run", source, net)
    return run, Bundle(source).sha256


def export(run: Path, out: Path, *extra: str) -> int:
    return main(["export", str(run), "--out", str(out), *extra])


def refused_in_one_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_an_unapproved_bundle_of_a_run_folder_never_runs(tmp_path, capsys, marker, where):
    run, digest = planted_run(tmp_path, marker, bundle_weights(tmp_path))
    if where == "outside":  # model.json's path to the bundle is all there is
        shutil.rmtree(run / "bundle")
    state = tmp_path / "node-state"
    approval.approve(state, "0" * 64)  # a node state that approved something else
    out = tmp_path / "exported"
    assert export(run, out, "--state", str(state)) == 2
    err = refused_in_one_line(capsys, digest, "--bundle PATH")
    if where == "inside":
        assert f"medfed node approve {digest} --state {state}" in err
        refusals = [e for e in read_audit(state / "audit.jsonl") if e["event"] == "bundle-refused"]
        assert [e["bundle_sha256"] for e in refusals] == [digest]
    else:
        assert "never followed" in err
    assert not out.exists() or not any(out.iterdir())
    predicted = tmp_path / "predicted"
    assert main(["predict", "--model", str(run), "--input", str(tmp_path),
                 "--out", str(predicted)]) == 2  # fmt: skip
    refused_in_one_line(capsys, digest, "medfed export", "--bundle PATH")
    with pytest.raises(RunFolderError, match="never followed"):  # the Python entry (previews)
        load_global_model(run)
    assert not marker.exists()


def test_a_named_bundle_whose_configs_differ_from_the_runs_is_refused(tmp_path, capsys, marker):
    clean = write_bundle(tmp_path / "clean")
    run = bundle_run(tmp_path / "run", clean, bundle_weights(tmp_path))
    planted = planted_bundle(tmp_path / "planted", marker)
    assert export(run, tmp_path / "out", "--bundle", str(planted)) == 2
    refused_in_one_line(capsys, Bundle(planted).sha256, Bundle(clean).sha256, "--bundle")
    assert not marker.exists()


def test_an_approved_copy_or_a_named_bundle_exports_the_federated_weights(tmp_path):
    source = write_bundle(tmp_path / "source")
    run = bundle_run(tmp_path / "run", source, bundle_weights(tmp_path))
    digest = Bundle(source).sha256
    state = tmp_path / "node-state"
    approval.approve(state, digest)
    shutil.rmtree(source)  # the coordinator's folder is not at the hospital
    copied = tmp_path / "from-copy"
    assert export(run, copied, "--state", str(state)) == 0
    named = write_bundle(tmp_path / "hospitals-copy")  # the same configs, elsewhere
    (named / "docs").mkdir()
    (named / "docs" / "README.md").write_text("the bundle's own docs")
    by_name = tmp_path / "by-name"
    assert export(run, by_name, "--bundle", str(named)) == 0  # no approval needed
    assert (by_name / "docs" / "README.md").is_file()  # the named folder, whole
    for out in (copied, by_name):
        assert (out / "models" / "model.pt").read_bytes() == (run / "global_model.pt").read_bytes()
        train = (out / "configs" / "train.json").read_bytes()
        assert train == (named / "configs" / "train.json").read_bytes()
        metadata = json.loads((out / "configs" / "metadata.json").read_text())
        assert metadata["medfed"]["config"]["bundle"] == str(source)
        net = Bundle(out).network()
        net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))


def test_approval_is_what_lets_a_run_folders_bundle_run(tmp_path, capsys, marker):
    """The refusal above is the approval's doing: once the hospital approves the hash, the
    export builds the bundle's network (its code runs, as `medfed node start` would)."""
    run, digest = planted_run(tmp_path, marker, bundle_weights(tmp_path))
    state = tmp_path / "node-state"
    assert export(run, tmp_path / "refused", "--state", str(state)) == 2
    assert not marker.exists()
    approval.approve(state, digest)
    assert export(run, tmp_path / "exported", "--state", str(state)) == 0
    assert marker.read_text() == "ran"


def _link_out(run: Path, outside: Path) -> None:
    shutil.rmtree(run / "bundle")
    (run / "bundle").symlink_to(outside, target_is_directory=True)


def _link_a_config_out(run: Path, outside: Path) -> None:
    train = run / "bundle" / "configs" / "train.json"
    train.unlink()
    train.symlink_to(outside / "configs" / "train.json")


@pytest.mark.parametrize("link", [_link_out, _link_a_config_out], ids=["folder", "config"])
def test_a_bundle_copy_that_links_out_of_the_run_folder_is_refused(tmp_path, capsys, marker, link):
    """Even with the hash approved: what a symlink reaches outside the folder can change
    after it was approved, and is not the run folder's."""
    run, digest = planted_run(tmp_path, marker, bundle_weights(tmp_path))
    link(run, tmp_path / "elsewhere")  # the same bytes, so the hash still matches
    state = tmp_path / "node-state"
    approval.approve(state, digest)
    assert export(run, tmp_path / "out", "--state", str(state)) == 2
    refused_in_one_line(capsys, "leads outside the run folder", "--bundle PATH")
    assert not marker.exists()


@pytest.mark.parametrize("path", ["../elsewhere", "absolute"])
def test_a_bundle_path_in_model_json_is_never_followed(tmp_path, capsys, marker, monkeypatch, path):
    run, digest = planted_run(tmp_path, marker, bundle_weights(tmp_path))
    shutil.rmtree(run / "bundle")
    meta = json.loads((run / "model.json").read_text())
    meta["config"]["bundle"] = str(tmp_path / "elsewhere") if path == "absolute" else path
    (run / "model.json").write_text(json.dumps(meta))
    monkeypatch.chdir(run)  # where "../elsewhere" is the planted bundle
    state = tmp_path / "node-state"
    approval.approve(state, digest)  # approved, yet not in the run folder
    assert export(run, tmp_path / "out", "--state", str(state)) == 2
    refused_in_one_line(capsys, digest, "never followed", "--bundle PATH")
    assert not marker.exists()


def test_a_changed_copy_is_refused_naming_both_hashes(tmp_path, capsys, marker):
    clean = write_bundle(tmp_path / "clean")
    run = bundle_run(tmp_path / "run", clean, bundle_weights(tmp_path))
    planted = planted_bundle(tmp_path / "planted", marker)
    shutil.copyfile(planted / "configs" / "train.json", run / "bundle" / "configs" / "train.json")
    state = tmp_path / "node-state"
    approval.approve(state, Bundle(planted).sha256)  # someone approved the planted hash
    assert export(run, tmp_path / "out", "--state", str(state)) == 2
    refused_in_one_line(capsys, Bundle(planted).sha256, Bundle(clean).sha256)
    assert not marker.exists()


def test_bundle_is_refused_for_a_run_that_federated_none(tmp_path, capsys):
    _, run = untrained_run(tmp_path / "run", task="classification",
                           **{"image-size": 32, "model-depth": 2})  # fmt: skip
    assert export(run, tmp_path / "out", "--bundle", str(write_bundle(tmp_path / "b"))) == 2
    refused_in_one_line(capsys, "--bundle", "not a task = bundle run")
