"""A simulated run that failed before its first round completed (issue 25): Ray's own
failures at start are tried once more by themselves, `--resume` starts any such run
again with its own settings, and the failed attempt's record is kept."""

from __future__ import annotations

import json

import tomli_w

from medfed.server.simulation import failed_start
from medfed.server.simulation.simulate import FEDERATION, RUN_CONFIG, prepare, resumed
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import METRICS_JSON

RAY_DIED = (
    "round 0 statistics: 0 hospitals replied, quorum is 2 (config key 'min-nodes'); missing: "
    "a hospital not yet named (node 1225, it never replied) (error: ActorDiedError: The actor "
    "died unexpectedly before finishing this task.)"
)


def _record(out, status="failed", error=RAY_DIED, rounds=()):
    out.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "error": error, "rounds": list(rounds)}
    (out / METRICS_JSON).write_text(json.dumps(record))
    return out


def test_a_ray_failure_before_any_round_is_worth_one_more_try(tmp_path):
    assert failed_start.ray_failure(_record(tmp_path / "a")) == "ActorDiedError"


def test_a_hospitals_own_error_or_a_run_with_a_round_is_not_retried(tmp_path):
    own = _record(tmp_path / "a", error="round 0 statistics: missing: site-1 (error: KeyError)")
    assert failed_start.ray_failure(own) is None
    later = _record(tmp_path / "b", rounds=[{"round": 0}])
    assert failed_start.ray_failure(later) is None
    assert not failed_start.nothing_completed(later)
    running = _record(tmp_path / "c", status="running")
    assert failed_start.ray_failure(running) is None


def test_resume_starts_a_run_with_no_completed_round_again_keeping_its_record(
    tmp_path, seg_sites, capsys
):
    """`medfed simulate --resume` refused such a run ("no completed round to resume from")
    although the failure message had advised it."""
    out = _record(tmp_path / "run")
    settings = {**RunConfig().to_mapping(), "data-root": str(seg_sites), "out-dir": str(out),
                "num-server-rounds": 3, "image-size": 32}  # fmt: skip
    (out / RUN_CONFIG).write_text(tomli_w.dumps(settings))
    (out / FEDERATION).write_text(tomli_w.dumps({"sites": 3, "cpus-per-site": 1}))
    cfg, data = prepare(resumed(out, {"num-server-rounds": 2}))
    assert cfg.resume_from == "", "started again, not carried on"
    assert cfg.num_server_rounds == 2 and cfg.image_size == 32, "its own settings, and -c"
    assert data == seg_sites
    assert not (out / METRICS_JSON).exists()
    kept = json.loads((out / "logs" / f"attempt-1-{METRICS_JSON}").read_text())
    assert kept["error"] == RAY_DIED, "the failed attempt's record is kept"
    assert "starting it again with its own settings" in capsys.readouterr().out


def test_a_raylet_lost_at_start_is_found_in_the_flower_log(tmp_path):
    """What a raylet killed at start left (a drill): the hospitals' reasons name no Ray
    class, Ray's own line in the run's Flower log does."""
    out = _record(tmp_path / "a", error="round 0 evaluation: 0 hospitals replied; missing: "
                  "a hospital not yet named (node 1, it never replied) (error: The actor never "
                  "ran - it was cancelled before it started running.)")  # fmt: skip
    assert failed_start.ray_failure(out) == "The actor never ran"
    plain = _record(tmp_path / "b", error="round 0 evaluation: 0 hospitals replied")
    assert failed_start.ray_failure(plain) is None
    (plain / "logs").mkdir()
    (plain / "logs" / "flower-run.log").write_text(
        "(raylet) Raylet is terminated. Termination is unexpected. Possible reasons include"
    )
    assert failed_start.ray_failure(plain) == "Raylet is terminated"
