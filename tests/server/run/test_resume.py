"""Resuming a run over the in-process grid: the resumed run ends where the uninterrupted
one does (strategy state, privacy ledger and random streams restored), its history has
every round once, and a checkpoint that is corrupted, foreign or missing is refused."""

from __future__ import annotations

import io
import json
import os
import random
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from medfed.server.run.coordinator_metrics import RoundTelemetry
from medfed.server.run.replies import QuorumError
from medfed.server.run.resume import ResumeError, load_resume_point, mark_continued
from medfed.server.run.round_loop import RoundLoop
from medfed.server.run.round_outputs import RunOutputs
from medfed.server.run.run_record import RunRecord
from medfed.server.run.strategies import build_strategy
from medfed.shared_models.config import RunConfig
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.run_folder import hold_writer_lock
from tests.bundles import write_bundle
from tests.in_process_grid import RUN_ID, InProcessGrid

NODES = {101: 1.0, 202: 2.0, 303: 4.0}
START = {"w": np.zeros(6, np.float32)}


def config(out, **values) -> RunConfig:
    defaults = {
        "task": "classification",
        "num-server-rounds": 4,
        "min-nodes": 2,
        "round-timeout-seconds": 0.3,
        "node-wait-seconds": 0.3,
        "federated-stats": False,
        "out-dir": str(out),
    }
    return RunConfig.from_mapping({**defaults, **values})


def federation(cfg: RunConfig) -> InProcessGrid:
    updates = {n: {"w": np.linspace(-d, d, 6).astype(np.float32)} for n, d in NODES.items()}
    return InProcessGrid(updates, dict.fromkeys(NODES, 1.0), cfg)


def run(cfg: RunConfig, grid: InProcessGrid, resume=None, progress=None):
    """What app.main does around the loop: seeded streams, the record, the outputs (its
    progress lines into `progress`)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    record = RunRecord(cfg, cfg.out_path, resume.history if resume else None)
    progress = progress if progress is not None else io.StringIO()
    outputs = RunOutputs(record, RoundTelemetry(RUN_ID, cfg.task), progress, RUN_ID, cfg)
    loop = RoundLoop(grid, cfg, outputs, partial(build_strategy, cfg), RUN_ID)
    try:
        arrays = loop.run(ArrayRecord({k: Array(v) for k, v in START.items()}), resume)
    except QuorumError as err:
        record.finish("failed", error=str(err))
        return None, json.loads((cfg.out_path / "metrics.json").read_text())
    record.finish("completed")
    return arrays["w"].numpy(), json.loads((cfg.out_path / "metrics.json").read_text())


def interrupted_after_round_2(cfg: RunConfig):
    """A run whose hospitals all fall silent in round 3: it fails with rounds 0..2 recorded."""
    grid = federation(cfg)
    grid.silent_from = dict.fromkeys(NODES, 3)
    final, metrics = run(cfg, grid)
    assert final is None and metrics["status"] == "failed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]


@pytest.mark.parametrize(
    "settings",
    [
        {"strategy": "fedavg"},
        {"strategy": "fedadam"},
        {"strategy": "fedavgm"},
        {"dp.mode": "server", "dp.noise-multiplier": 0.5, "dp.clipping-norm": 1.0},
        {"strategy": "fedadam", "secure-aggregation": True},
    ],
    ids=["fedavg", "fedadam", "fedavgm", "server-dp", "secure-fedadam"],
)
def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_does(tmp_path, settings):
    """Everything a checkpoint carries is restored, so the resumed run ends where the
    unbroken one does; DP noise is the exception by design (drawn afresh from the
    operating system, never checkpointed): under DP the models differ, the rest is equal."""
    whole = config(tmp_path / "whole", **settings)
    expected, uninterrupted = run(whole, federation(whole))

    cfg = config(tmp_path / "broken", **settings)
    interrupted_after_round_2(cfg)
    resumed_cfg = config(tmp_path / "broken", **settings, **{"resume-from": str(cfg.out_path)})
    point = load_resume_point(resumed_cfg, None)
    assert point.server_round == 2
    said = io.StringIO()
    final, metrics = run(resumed_cfg, federation(resumed_cfg), point, said)
    secure = "secure-aggregation" in settings  # fresh keys are news only where there are keys
    assert ("secure aggregation starts fresh keys" in said.getvalue()) is secure

    noisy = "dp.mode" in settings
    assert np.allclose(final, expected, atol=1e-6, rtol=0) != noisy
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3, 4]
    assert metrics["resumed"][0]["after-round"] == 2
    for got, want in zip(metrics["rounds"], uninterrupted["rounds"], strict=True):
        assert got["global"] == pytest.approx(want["global"], abs=1e-9)


def test_state_matters_fedadam_without_its_moments_would_end_elsewhere(tmp_path):
    """The test above could pass by accident if FedAdam's state made no difference."""
    whole = config(tmp_path / "whole", strategy="fedadam")
    expected, _ = run(whole, federation(whole))
    cfg = config(tmp_path / "broken", strategy="fedadam")
    interrupted_after_round_2(cfg)
    point = load_resume_point(config(tmp_path / "broken", strategy="fedadam",
                                     **{"resume-from": str(cfg.out_path)}), None)  # fmt: skip
    point.state["layers"][0]["values"].clear()  # forget m_t and v_t
    stateless, _ = run(config(tmp_path / "broken", strategy="fedadam"), federation(cfg), point)
    assert not np.allclose(stateless, expected, atol=1e-4)


def test_the_privacy_ledger_carries_over(tmp_path):
    dp = {"dp.mode": "server", "dp.noise-multiplier": 0.5}
    whole = config(tmp_path / "whole", **dp)
    _, uninterrupted = run(whole, federation(whole))
    cfg = config(tmp_path / "broken", **dp)
    interrupted_after_round_2(cfg)
    again = config(tmp_path / "broken", **dp, **{"resume-from": str(cfg.out_path)})
    _, metrics = run(again, federation(again), load_resume_point(again, None))
    spent = [r["global"]["dp-epsilon"] for r in metrics["rounds"][1:]]
    assert spent == pytest.approx([r["global"]["dp-epsilon"] for r in uninterrupted["rounds"][1:]])
    assert spent[3] > spent[1], "epsilon keeps growing after the resume"


def _interrupted(tmp_path, **settings) -> RunConfig:
    cfg = config(tmp_path / "run", **settings)
    interrupted_after_round_2(cfg)
    return config(tmp_path / "run", **settings, **{"resume-from": str(cfg.out_path)})


def test_a_corrupted_checkpoint_is_refused_naming_it(tmp_path):
    cfg = _interrupted(tmp_path)
    checkpoint = cfg.out_path / "checkpoints" / "round-002.pt"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"round-002\.pt is corrupted or was replaced"):
        load_resume_point(cfg, None)


def test_a_missing_checkpoint_is_refused(tmp_path):
    cfg = _interrupted(tmp_path)
    (cfg.out_path / "checkpoints" / "round-002.pt").unlink()
    with pytest.raises(ResumeError, match=r"round-002\.pt is missing"):
        load_resume_point(cfg, None)


def test_other_settings_are_refused_naming_each_key(tmp_path):
    _interrupted(tmp_path)
    other = config(tmp_path / "run", lr=0.1, strategy="fedadam",
                   **{"resume-from": str(tmp_path / "run")})  # fmt: skip
    with pytest.raises(ResumeError) as refused:
        load_resume_point(other, None)
    assert "lr = 0.003 there, 0.1 here" in str(refused.value)
    assert "strategy = 'fedavg' there, 'fedadam' here" in str(refused.value)


def test_a_finished_run_or_an_empty_folder_is_refused(tmp_path):
    cfg = config(tmp_path / "done", **{"num-server-rounds": 2})
    run(cfg, federation(cfg))
    again = config(tmp_path / "done", **{"num-server-rounds": 2, "resume-from": str(cfg.out_path)})
    with pytest.raises(ResumeError, match="completed round 2 of 2; raise 'num-server-rounds'"):
        load_resume_point(again, None)
    longer = config(tmp_path / "done", **{"num-server-rounds": 3, "resume-from": str(cfg.out_path)})
    assert load_resume_point(longer, None).server_round == 2
    empty = config(tmp_path / "x", **{"resume-from": str(tmp_path / "nothing")})
    with pytest.raises(ResumeError, match=r"no metrics\.json: not a medfed run folder"):
        load_resume_point(empty, None)


def test_a_run_still_running_is_refused(tmp_path):
    cfg = _interrupted(tmp_path)
    metrics = json.loads((cfg.out_path / "metrics.json").read_text())
    metrics["status"] = "running"
    (cfg.out_path / "metrics.json").write_text(json.dumps(metrics))
    writer = hold_writer_lock(cfg.out_path)  # as the live ServerApp holds it
    try:
        with pytest.raises(ResumeError, match="that run is still running"):
            load_resume_point(cfg, None)
    finally:
        os.close(writer)
    assert load_resume_point(cfg, None).server_round == 2, "once its writer is gone"


DP = {"dp.mode": "server", "dp.noise-multiplier": 0.5}
# a model evaluated in a message of its own, sent out after aggregation and before its
# round is recorded (validated by the next training message, it leaves after the record)
SEPARATE = {"separate-evaluation": True}


def released(grid: InProcessGrid, server_round: int) -> np.ndarray:
    """The model the coordinator sent out for evaluation after `server_round`'s aggregation."""
    sent = [m for m in grid.pushed if m.metadata.message_type == "evaluate"
            and InProcessGrid.round_of(m) == server_round]  # fmt: skip
    return sent[0].content["arrays"]["w"].numpy()


def epsilons(metrics: dict) -> list[float]:
    return [r["global"]["dp-epsilon"] for r in metrics["rounds"][1:]]


@pytest.mark.parametrize("lost_round", [1, 3])
def test_a_noisy_model_released_after_the_last_checkpoint_is_counted_and_never_renoised(
    tmp_path, lost_round
):
    """Round k's noisy aggregate went out for evaluation, then the run failed before the
    round was recorded: the resumed round k draws fresh noise and the ledger counts both
    (also when the last checkpoint is round 0's, whose ledger is still empty)."""
    whole = config(tmp_path / "whole", **DP, **SEPARATE, **{"num-server-rounds": 6})
    _, reference = run(whole, federation(whole))  # epsilon after 1..6 releases

    cfg = config(tmp_path / "broken", **DP, **SEPARATE)
    grid = federation(cfg)
    grid.stage_silent_from["evaluate"] = lost_round  # hospitals lost during its evaluation
    final, metrics = run(cfg, grid)
    assert final is None and metrics["releases-since-checkpoint"] == 1
    assert [r["round"] for r in metrics["rounds"]] == list(range(lost_round))

    again = config(tmp_path / "broken", **DP, **SEPARATE, **{"resume-from": str(cfg.out_path)})
    point = load_resume_point(again, None)
    assert point.lost_releases == 1
    resumed_grid = federation(again)
    _, resumed = run(again, resumed_grid, point)
    assert not np.allclose(released(resumed_grid, lost_round), released(grid, lost_round))
    expected = epsilons(reference)
    assert epsilons(resumed)[lost_round - 1] == pytest.approx(expected[lost_round])


def test_releases_lost_by_a_resumed_run_are_counted_when_it_is_resumed_again(tmp_path):
    whole = config(tmp_path / "whole", **DP, **SEPARATE, **{"num-server-rounds": 6})
    _, reference = run(whole, federation(whole))
    cfg = config(tmp_path / "broken", **DP, **SEPARATE)
    for attempt in range(2):  # the run, then its first resume, die in round 3's evaluation
        grid = federation(cfg)
        grid.stage_silent_from["evaluate"] = 3
        point = load_resume_point(cfg, None) if attempt else None
        _, metrics = run(cfg, grid, point)
        assert metrics["releases-since-checkpoint"] == attempt + 1
        cfg = config(tmp_path / "broken", **DP, **SEPARATE, **{"resume-from": str(cfg.out_path)})
    point = load_resume_point(cfg, None)
    assert point.lost_releases == 2
    _, resumed = run(cfg, federation(cfg), point)
    assert epsilons(resumed)[2] == pytest.approx(epsilons(reference)[4]), "5 releases by round 3"


def test_a_run_is_carried_on_once(tmp_path):
    cfg = _interrupted(tmp_path)
    first = config(tmp_path / "first", **{"resume-from": str(cfg.out_path)})
    point = load_resume_point(first, None)
    mark_continued(point.folder, first.out_path)
    with pytest.raises(ResumeError, match=r"already carried on in .*first; resume from that"):
        load_resume_point(config(tmp_path / "second", **{"resume-from": str(cfg.out_path)}), None)


def test_the_accountant_keeps_its_population_when_the_quorum_connects_first(tmp_path):
    """On resume the quorum (2) may be connected before the third hospital: the privacy
    accountant is still built for the population it was built for (3)."""
    cfg = _interrupted(tmp_path, **DP)
    grid = federation(cfg)
    everyone = list(NODES)
    answers = iter([everyone[:2]])
    grid.get_node_ids = lambda: next(answers, everyone)
    final, metrics = run(cfg, grid, load_resume_point(cfg, None))
    assert metrics["status"] == "completed" and final is not None


def test_a_bundle_run_resumes_only_with_the_bundle_configs_it_started_with(tmp_path):
    """The same `bundle` path may hold other configs by now: refused on their hash, before
    the network is built from them."""
    bundle = write_bundle(tmp_path / "bundle")
    cfg = _interrupted(tmp_path)
    resumed = config(tmp_path / "run", task="bundle", bundle=str(bundle),
                     **{"resume-from": str(cfg.out_path)})  # fmt: skip
    record = json.loads((cfg.out_path / "metrics.json").read_text())
    record["config"] = {**resumed.to_mapping(), "resume-from": ""}  # as if it had been one
    record["bundle"] = Bundle(bundle).identity()
    (cfg.out_path / "metrics.json").write_text(json.dumps(record))
    assert load_resume_point(resumed, None).server_round == 2
    write_bundle(bundle, lr=0.5)
    with pytest.raises(ResumeError) as refused:
        load_resume_point(resumed, None)
    assert f"federated bundle sha256 {record['bundle']['sha256']}" in str(refused.value)
    assert Bundle(bundle).sha256 in str(refused.value)
