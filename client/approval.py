"""Code approval at the hospital: a node runs only app packages its hospital approved.

In the spirit of Fed-BioMed's training-plan approval: the code that touches
a hospital's images is the code its own staff looked at and approved, by the
SHA-256 of the app package (Flower's FAB: a zip of the app's files and its
pyproject.toml). The approved hashes are a file in the node's state folder,
written by `medfed node approve`. A package that is not approved is refused
before anything in it is installed or imported (client/app_runner.py), kept
under `refused-apps/` for `medfed node inspect`, and the refusal is audited
with its hash.

Flower's own `--trusted-entities` needs a SuperLink that signs packages
(licensed builds only), so medfed checks the content hash itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.audit import audit

APPROVED_FILE = "approved-apps.json"
REFUSED_DIR = "refused-apps"
# Set by `medfed node start` for the processes of its SuperNode.
STATE_ENV = "MEDFED_NODE_STATE"
SITE_ENV = "MEDFED_SITE_NAME"


class AppNotApproved(RuntimeError):
    """The run's app package is not approved at this site; the message names both."""


def package_hash(content: bytes) -> str:
    """The package's SHA-256, as Flower names a FAB (`flwr build` prints it too)."""
    return hashlib.sha256(content).hexdigest()


def approved(state: Path) -> dict[str, dict[str, Any]]:
    """hash -> when and with which note each package was approved."""
    path = state / APPROVED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def approve(state: Path, digest: str, note: str = "") -> None:
    """Approve the package with SHA-256 `digest` (64 hex characters) at this node."""
    digest = digest.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{digest!r}: expected a package's SHA-256, 64 hex characters")
    entries = approved(state)
    entries[digest] = {"approved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": note}
    state.mkdir(parents=True, exist_ok=True)
    atomic_write(state / APPROVED_FILE, json.dumps(entries, indent=2).encode())
    audit("app-approved", log=state / "audit.jsonl", app_sha256=digest, note=note)


def revoke(state: Path, digest: str) -> bool:
    """Withdraw an approval; False when the package was not approved."""
    entries = approved(state)
    if entries.pop(digest.strip().lower(), None) is None:
        return False
    atomic_write(state / APPROVED_FILE, json.dumps(entries, indent=2).encode())
    audit("app-revoked", log=state / "audit.jsonl", app_sha256=digest)
    return True


def check(content: bytes) -> str:
    """The package's hash if this node approved it; AppNotApproved (audited) if not.

    Runs in the process that is about to install the package, before anything
    of it is written or imported. The node's state folder and site name come
    from the environment `medfed node start` gives its SuperNode.
    """
    state = Path(os.environ.get(STATE_ENV, ""))
    site = os.environ.get(SITE_ENV, "this site")
    digest = package_hash(content)
    if os.environ.get(STATE_ENV) and digest in approved(state):
        return digest
    if os.environ.get(STATE_ENV):
        refused = state / REFUSED_DIR / f"{digest}.fab"
        refused.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(refused, content)
        audit("app-refused", log=state / "audit.jsonl", site=site, app_sha256=digest)
    raise AppNotApproved(
        f"app package sha256 {digest} is not approved at {site}: its staff can inspect it "
        f"with `medfed node inspect {digest[:16]}` and approve it with `medfed node approve`"
    )


def check_bundle(digest: str) -> None:
    """Refuse (audited) a MONAI bundle this node did not approve.

    A bundle's configs are code (`_target_` imports, `$` expressions, scripts/) and
    the run config, which the coordinator chooses, names the folder: on a node
    started by `medfed node start` their hash (configs/ and scripts/, `Bundle.sha256`)
    must be approved like an app package's. A simulation has no node state: the
    researcher runs their own bundle on their own machine.
    """
    if not os.environ.get(STATE_ENV):
        return
    state = Path(os.environ[STATE_ENV])
    if digest in approved(state):
        return
    site = os.environ.get(SITE_ENV, "this site")
    audit("bundle-refused", log=state / "audit.jsonl", site=site, bundle_sha256=digest)
    raise AppNotApproved(
        f"MONAI bundle sha256 {digest} is not approved at {site}: its staff can list what the "
        f"hash covers with `medfed node inspect BUNDLE_FOLDER` and approve it with "
        f"`medfed node approve {digest}`"
    )


@dataclass(frozen=True)
class PackageFile:
    """One file of an app package, as `medfed node inspect` lists it."""

    name: str
    size: int
    sha256: str


def inspect(content: bytes) -> dict[str, Any]:
    """What an app package holds: its hash, every file, and what Flower will run from it."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        files = [
            PackageFile(info.filename, info.file_size, hashlib.sha256(fab.read(info)).hexdigest())
            for info in fab.infolist()
            if not info.is_dir()
        ]
        app = tomllib.loads(fab.read("pyproject.toml").decode()).get("tool", {}).get("flwr", {})
    components = app.get("app", {}).get("components", {})
    return {
        "sha256": package_hash(content),
        "components": {
            role: f"{ref} ({component_origin(ref, [f.name for f in files])})"
            for role, ref in components.items()
        },
        "config": app.get("app", {}).get("config", {}),
        "files": files,
    }


def component_origin(ref: str, package_files: list[str]) -> str:
    """Where the code a component reference names comes from when the node runs it.

    Flower imports `module:attribute` with the package's folder first on the
    path: the package's own files win, else the module installed at the node.
    medfed's packages name `medfed.client.app:app`, which is the hospital's
    installed medfed; the package then chooses the entry points and defaults.
    """
    top = ref.split(":", 1)[0].split(".", 1)[0]
    if any(name == f"{top}.py" or name.startswith(f"{top}/") for name in package_files):
        return "code from this package"
    distributions = importlib.metadata.packages_distributions().get(top, [])
    if not distributions:
        return "not in this package and not installed at this node: would fail"
    name = distributions[0]
    return f"code installed at this node: {name} {importlib.metadata.version(name)}"


def find_package(state: Path, name: str) -> bytes:
    """A package by file path, or by (a prefix of) the hash of one this node refused."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_bytes()
    matches = sorted((state / REFUSED_DIR).glob(f"{name.lower()}*.fab"))
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        raise ValueError(
            f"{name!r}: not a package file, and {found} refused package(s) under "
            f"{state / REFUSED_DIR} start with it"
        )
    return matches[0].read_bytes()
