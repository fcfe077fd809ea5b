"""Which MONAI bundle may rebuild a task = bundle run's model at this site (`medfed export`).

A bundle's configs are code (`_target_` imports and calls, `$` expressions run when
its network is built), and a run folder comes from elsewhere: the operator hands it
to the hospitals. So the bundle path model.json names (a folder on the coordinator's
disk) is never followed. A bundle run's network is built only from
- a bundle folder the user names (`--bundle PATH`), whose configs hash to what the
  run recorded (other configs need not build the network these weights fit), or
- the run folder's own copy of the bundle's hashed files (`bundle/`, written by the
  coordinator when the run started) when nothing of it leads outside the run folder,
  it hashes to what the run recorded, and that hash is approved at this site: the
  node state's approvals that `medfed node start` runs bundles by.
All of it is decided on file bytes, before any config is read into objects; a
refusal is audited (`bundle-refused`) in the node state's log when there is one.
"""

from __future__ import annotations

import os
from pathlib import Path

from medfed.client.approval import AppNotApproved, approved
from medfed.shared_models.audit import audit
from medfed.shared_models.monai_bundle import HASHED_FOLDERS, bundle_sha256, hashed_files
from medfed.shared_models.run_folder import RUN_BUNDLE, RunFolderError, recorded_bundle_sha256


def checked_bundle(run_dir: Path, named: Path | None, state: Path) -> Path:
    """The bundle folder the network of the bundle run in `run_dir` may be built from:
    `named` when given, else the run folder's approved copy; refused in one line
    naming the bundle's hash and both ways forward otherwise."""
    recorded = recorded_bundle_sha256(run_dir)
    if named is not None:
        return _named(named, recorded)
    return _carried(run_dir, recorded, state)


def _named(named: Path, recorded: str) -> Path:
    """A bundle folder the user chose: used when its configs are the run's."""
    root = named.expanduser().resolve()
    if not (root / "configs").is_dir():
        raise RunFolderError(f"--bundle {named}: not a MONAI bundle folder (no configs/)")
    digest = bundle_sha256(root)
    if digest != recorded:
        raise RunFolderError(
            f"--bundle {named}: its {' and '.join(HASHED_FOLDERS)} hash to {digest}, the run "
            f"federated bundle sha256 {recorded}; the weights fit that bundle's network only"
        )
    return root


def _carried(run_dir: Path, recorded: str, state: Path) -> Path:
    """The run folder's own copy of its bundle, once it is inside the folder, the run's,
    and approved at this site."""
    copy = run_dir / RUN_BUNDLE
    if not copy.is_dir() and not copy.is_symlink():
        raise RunFolderError(
            f"{run_dir}: MONAI bundle sha256 {recorded} is not in the run folder (no "
            f"{RUN_BUNDLE}/; the bundle path in model.json is never followed): name a copy "
            "of it you trust with --bundle PATH"
        )
    escape = _leaving(run_dir, copy)
    if escape is not None:
        raise RunFolderError(
            f"{escape}: leads outside the run folder {run_dir} (to {escape.resolve()}); "
            "nothing a run folder names outside itself is used: name the bundle with "
            "--bundle PATH"
        )
    digest = bundle_sha256(copy)
    if digest != recorded:
        raise RunFolderError(
            f"{copy}: hashes to {digest}, but the run federated bundle sha256 {recorded} "
            "(model.json): the copy was changed; name the run's bundle with --bundle PATH"
        )
    if digest not in approved(state):
        if state.is_dir():
            audit("bundle-refused", log=state / "audit.jsonl", bundle_sha256=digest)
        raise AppNotApproved(
            f"MONAI bundle sha256 {digest} (the run's {RUN_BUNDLE}/) is not approved at "
            f"this site ({state}): its configs are code; list what the hash covers with "
            f"`medfed node inspect {copy}` and approve it with `medfed node approve "
            f"{digest} --state {state}`, or name a bundle folder you trust with --bundle PATH"
        )
    return copy.resolve()


def _leaving(run_dir: Path, copy: Path) -> Path | None:
    """The first path at or under `copy` that resolves outside `run_dir` (a symlink
    pointing out), or None: every entry of the folder (symlinked folders checked, not
    descended into) and every file the hash reads, wherever a link inside led."""
    base = run_dir.resolve()
    if not copy.resolve().is_relative_to(base):
        return copy
    entries = [Path(top) / name for top, dirs, files in os.walk(copy) for name in dirs + files]
    for path in entries + hashed_files(copy):
        if not path.resolve().is_relative_to(base):
            return path
    return None
