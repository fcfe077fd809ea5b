import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from medfed.server.cli import build_parser, main
from medfed.shared_models import metrics_exporter
from medfed.shared_models.supervision import free_port


def _medfed(*args):
    return subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", *args], capture_output=True, text=True
    )


def _in_process(capsys, *args: str) -> tuple[int, str]:
    """`medfed ARGS` run by `main` in this process (no interpreter start nor torch import per
    case): its exit code and standard error. An exception `main` lets out fails the test."""
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--task", "detection"], "'task' = 'detection'"),
        (["--strategy", "fedsgd"], "'strategy' = 'fedsgd'"),
        (["--rounds", "0"], "'num-server-rounds' = 0"),
        (["-c", "lr=-1"], "'lr' = -1"),
        (["--sites", "2", "-c", "min-nodes=3"], "'min-nodes' = 3: more than the 2 simulated"),
        (["--images-per-site", "0"], "--images-per-site 0: expected 8..100000"),
        (["--sites", "0"], "--sites 0: expected 1..1000 hospitals"),
        (["-c", "image-size=100000"], "'image-size' = 100000"),
        (
            ["--resume", "nowhere"],
            "--resume carries a run on with its own settings, data and "
            "folder: --out cannot be given with it",
        ),
    ],
)
def test_bad_simulate_arguments_fail_cleanly(tmp_path, capsys, args, named):
    code, error = _in_process(capsys, "simulate", "--out", str(tmp_path / "run"), *args)
    assert code == 2
    assert named in error
    assert not (tmp_path / "run").exists(), "nothing is started or written on bad input"


def test_an_unreachable_ray_cluster_fails_cleanly(tmp_path):
    """In a process of its own: Ray's client keeps state in the process that asked."""
    result = _medfed("simulate", "--out", str(tmp_path / "run"), "--ray-address", "127.0.0.1:1")
    assert result.returncode == 2
    assert "--ray-address 127.0.0.1:1: no Ray cluster answers" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing is started or written on bad input"


def test_resume_names_a_folder_simulate_did_not_write(tmp_path, capsys):
    code, error = _in_process(capsys, "simulate", "--resume", str(tmp_path))
    assert code == 2 and "no federation.toml" in error


def test_bad_data_folder_names_the_file(tmp_path):
    site = tmp_path / "data" / "site-0"
    site.mkdir(parents=True)
    (site / "dataset.json").write_text("[1, 2")
    result = _medfed("simulate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "site-0/dataset.json" in result.stderr or "site folders" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_synth_writes_sites(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synth",
                "--task",
                "classification",
                "--sites",
                "2",
                "--out",
                str(tmp_path),
                "--images-per-site",
                "10",
                "--image-size",
                "32",
            ]
        )
        == 0
    )
    assert (tmp_path / "site-1" / "dataset.json").exists()
    assert "site-1" in capsys.readouterr().out


def test_an_empty_site_folder_under_data_is_named(tmp_path):
    site = tmp_path / "data" / "site-0"
    site.mkdir(parents=True)
    (site / "dataset.json").write_text('{"task": "classification", "training": []}')
    (tmp_path / "data" / "site-1").mkdir()
    result = _medfed("simulate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "site-1 is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_sites_are_listed_only_once_the_checks_before_them_pass(tmp_path, capsys):
    """The sites of --data are found once per run, when a step first needs them: a run whose
    --sites or output folder is wrong says so, not that its data root is missing."""
    missing = str(tmp_path / "nowhere")
    assert main(["simulate", "--data", missing, "--sites", "0", "--out", str(tmp_path)]) == 2
    assert "--sites 0: expected" in capsys.readouterr().err
    assert main(["simulate", "--data", missing, "--sites", "2", "--out", str(tmp_path)]) == 2
    assert f"data root {missing} does not exist" in capsys.readouterr().err


def test_a_run_without_out_is_named_after_its_sites_task(cls_sites):
    from medfed.server.cli import default_out
    from medfed.server.simulation.simulate import find_sites

    assert default_out({}, find_sites(cls_sites), 3).name.endswith("-classification")
    assert default_out({"task": "regression"}, find_sites(cls_sites), 3).name.endswith(
        "-regression"
    )
    assert default_out({}, None, 3).name.endswith("-segmentation")


def _listening(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses a socket listens on at `port` (from /proc/net)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                found.add(
                    ".".join(str(b) for b in raw[::-1])
                    if width == 8
                    else ipaddress.IPv6Address(
                        b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    ).compressed
                )
    return found


@pytest.mark.parametrize(
    "command",
    [
        ["node", "start", "--coordinator", "h:1", "--data", "site"],
        ["coordinator", "start"],
        ["simulate"],
    ],
    ids=["node", "coordinator", "simulate"],
)
def test_every_service_serves_its_metrics_on_this_host_only_by_default(tmp_path, command):
    """A metrics port open to the hospital's network would publish its training figures:
    unless --metrics-host says otherwise, the exporter each service starts listens on
    127.0.0.1 only."""
    port = free_port()
    args = build_parser().parse_args([*command, "--metrics-port", str(port)])
    env: dict[str, str] = {}
    metrics_exporter.export_metrics(tmp_path / "metrics", args.metrics_port, args.metrics_host, env)
    assert _listening(port) == {"127.0.0.1"}


def _checkout_with(folder: Path, **settings: object) -> Path:
    """`folder` holding the repository's pyproject.toml with `settings` in its run config
    table: a checkout whose settings were edited."""
    document = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    document["tool"]["flwr"]["app"]["config"].update(settings)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(document))
    return folder


def _simulation_of(monkeypatch, *args: str):
    """The Simulation `medfed simulate ARGS` would run (nothing is started)."""
    import medfed.server.simulation.simulate as simulate

    started = []
    monkeypatch.setattr(simulate, "run", lambda sim: started.append(sim) or 0)
    assert main(["simulate", *args]) == 0
    return started[0]


def test_simulate_takes_the_settings_of_the_current_folders_pyproject(tmp_path, monkeypatch):
    """Issue 25: an edit of the checkout's pyproject.toml changed nothing."""
    monkeypatch.chdir(_checkout_with(tmp_path, **{"num-server-rounds": 1, "strategy": "fedprox"}))
    sim = _simulation_of(monkeypatch, "--out", "run")
    assert sim.overrides["num-server-rounds"] == 1
    assert sim.overrides["strategy"] == "fedprox"
    assert "local-epochs" not in sim.overrides, "a key left at its default is not a choice"
    assert _simulation_of(monkeypatch, "--rounds", "5").overrides["num-server-rounds"] == 5


def test_simulate_config_names_a_file_of_keys(tmp_path, monkeypatch):
    out = tmp_path / "elsewhere"
    settings = {"lr": 0.001, "out-dir": str(out), "dp": {"mode": "client"}}
    (tmp_path / "mine.toml").write_text(tomli_w.dumps(settings))
    sim = _simulation_of(monkeypatch, "--config", str(tmp_path / "mine.toml"), "--sites", "2")
    assert sim.overrides["lr"] == 0.001 and sim.overrides["dp.mode"] == "client"
    assert sim.out == out, "the file's out-dir is the run's --out"


def test_an_unknown_key_in_pyproject_stops_simulate_naming_file_and_key(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(_checkout_with(tmp_path, **{"local-epoch": 2}))
    code, error = _in_process(capsys, "simulate", "--out", str(tmp_path / "run"))
    assert code == 2
    assert "pyproject.toml [tool.flwr.app.config]: unknown config key 'local-epoch'" in error
    assert "did you mean 'local-epochs'?" in error
    assert not (tmp_path / "run").exists()


def test_someone_elses_pyproject_is_not_read(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config]\nlocal-epoch = 2\n")
    monkeypatch.chdir(tmp_path)
    assert "local-epoch" not in _simulation_of(monkeypatch, "--out", "run").overrides
