"""A run folder that is damaged or tampered with is refused in one line naming the file."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medfed.server.cli import main
from medfed.shared_models.run_folder import (
    GLOBAL_MODEL,
    MODEL_JSON,
    RunFolderError,
    load_global_model,
)
from tests.trained_models import untrained_run


class Payload:
    """What a pickled object would run when loaded without weights_only."""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (print, ("code ran",))


def _config(path: Path, mapping: object) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "config": mapping}))


TAMPERED: dict[str, tuple[str, Callable[[Path], object]]] = {
    "model.json not JSON": (MODEL_JSON, lambda p: p.write_text("{oops")),
    "model.json without config": (MODEL_JSON, lambda p: p.write_text("{}")),
    "config not an object": (MODEL_JSON, lambda p: _config(p, [1, 2])),
    "weights missing": (GLOBAL_MODEL, lambda p: p.unlink()),
    "weights not a torch file": (GLOBAL_MODEL, lambda p: p.write_bytes(b"not a model")),
    "a pickled object": (GLOBAL_MODEL, lambda p: p.write_bytes(pickle.dumps(Payload()))),
    "a whole module": (GLOBAL_MODEL, lambda p: torch.save(torch.nn.Linear(2, 2), p)),
    "another network's weights": (GLOBAL_MODEL, lambda p: torch.save({"a": torch.zeros(3)}, p)),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_damaged_run_is_refused_naming_the_file(tmp_path, capsys, case):
    _, run = untrained_run(tmp_path / "run", task="classification",
                           **{"image-size": 32, "model-depth": 2})  # fmt: skip
    name, damage = TAMPERED[case]
    damage(run / name)
    with pytest.raises(RunFolderError, match=f"^{run / name}: "):
        load_global_model(run)
    assert "code ran" not in capsys.readouterr().out  # weights_only holds
    predict = ["predict", "--model", str(run), "--input", str(run), "--out", str(tmp_path / "p")]
    for argv in (["export", str(run), "--out", str(tmp_path / "b")], predict):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"medfed: error: {run / name}: ")
        assert err.count("\n") == 1, err
