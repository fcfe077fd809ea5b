"""medfed installs as a wheel: every module of the source tree is in it, and the command
line runs from a fresh virtual environment holding the wheel and nothing of the checkout."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("server", "client", "shared_models")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    return next(out.glob("medfed-*.whl"))


def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [
        p.relative_to(ROOT).as_posix() for room in ROOMS for p in (ROOT / room).rglob("*.py")
    ]
    assert "client/data/loader.py" in sources
    missing = [s for s in sources if f"medfed/{s}" not in names]
    assert missing == []
    assert not [n for n in names if n.startswith(("tests/", "docs/", "deploy/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = {
        line.split(":", 1)[1].strip().split()[0].split("[")[0].split("=")[0].split(">")[0]
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert {"flwr", "torch", "monai", "cryptography", "prometheus-client"} <= requires


def test_an_installed_wheel_runs_the_command_line(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, medfed = venv / "bin" / "python", venv / "bin" / "medfed"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    # Then the dependencies (torch, MONAI, Flower) from this environment, after the new
    # one's own packages: no downloads, and medfed itself is the wheel's copy.
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [python, "-c", "import medfed.client.data.loader as m, medfed.server.app as a; "
         "print(m.__file__); print(a.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(site) for line in where.stdout.split()), where.stdout

    help_text = subprocess.run([medfed, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert all(c in help_text.stdout for c in ("simulate", "data", "node", "coordinator"))
    synth = subprocess.run(
        [medfed, "data", "synth", "--task", "classification", "--sites", "2",
         "--out", str(tmp_path / "sites"), "--images-per-site", "6", "--image-size", "32"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    for site_folder in ("site-0", "site-1"):
        assert (tmp_path / "sites" / site_folder / "dataset.json").is_file()
