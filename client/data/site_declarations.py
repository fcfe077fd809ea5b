"""The task and classes a federation's site folders declare, for a run that names neither.

A researcher pointing `medfed simulate --data` or `medfed bench quality --data`
at real site folders should not have to repeat in `--task` and `class-names`
what every site's dataset.json already says; sites that disagree are named,
since no one run can fit them all. Sites whose manifest declares nothing
(manifest.csv, .npz, a dataset.json without the key) follow the others.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from medfed.client.data.manifest import (
    MANIFEST_JSON,
    SiteDataError,
    declared_classes,
    find_manifest,
    read_rows,
)
from medfed.client.data.site_paths import site_folders
from medfed.shared_models.task_descriptions import TASK_NAMES


class SiteDeclarations:
    """A run's site folders and what their dataset.json declare alike: the folders listed
    and each file read once, when the run first asks (a run that names its task never has
    its sites' tasks read)."""

    def __init__(self, folders: list[Path] | None = None, root: Path | None = None) -> None:
        """`folders`, or every site folder under `root` (site_paths.site_folders)."""
        self._folders = None if folders is None else list(folders)
        self._root = root
        self._read: dict[Path, tuple[Path, dict[str, Any]] | None] = {}

    @property
    def folders(self) -> list[Path]:
        """The site folders; under a root, listed when first asked for, once."""
        if self._folders is None:
            self._folders = site_folders(self._root)
        return self._folders

    def first(self, count: int) -> SiteDeclarations:
        """The first `count` sites (all there are, when fewer): what either reads of a site's
        dataset.json, the other has read too."""
        kept = SiteDeclarations(self.folders[:count])
        kept._read = self._read
        return kept

    def task(self) -> str | None:
        """The task that every site naming one in its dataset.json ('task') names alike;
        None when no site names one.

        Raises SiteDataError naming the file of a task medfed does not know, or each site
        and its task when they disagree.
        """
        declared = self._by_value(_task)
        if len(declared) > 1:
            groups = "; ".join(f"{', '.join(s)}: {task}" for task, s in declared.items())
            raise SiteDataError(
                f"the sites' dataset.json declare different tasks ({groups}); make them "
                "agree, or pass the run's --task"
            )
        return next(iter(declared)) if declared else None

    def classes(self) -> list[str] | None:
        """The classes that every site declaring labels in its dataset.json declares alike;
        None when no site declares any (CSV and .npz manifests never do).

        Raises SiteDataError naming each site and its classes when they disagree.
        """
        declared = self._by_value(lambda _, raw: _classes(raw))
        if len(declared) > 1:
            groups = "; ".join(f"{', '.join(s)}: [{', '.join(c)}]" for c, s in declared.items())
            raise SiteDataError(
                f"the sites' dataset.json declare different labels ({groups}); make them "
                "agree, or set the run's classes (config key 'class-names')"
            )
        return list(next(iter(declared))) if declared else None

    def _manifest(self, folder: Path) -> tuple[Path, dict[str, Any]] | None:
        """(its dataset.json, what it holds) of one site, read once; None for a site whose
        manifest is another kind."""
        if folder not in self._read:
            manifest = find_manifest(folder)
            json = manifest.name == MANIFEST_JSON
            self._read[folder] = (manifest, read_rows(manifest)) if json else None
        return self._read[folder]

    def _by_value(
        self, value: Callable[[Path, dict[str, Any]], Hashable | None]
    ) -> dict[Any, list[str]]:
        """The sites (folder names) by what `value` reads from their dataset.json, site by
        site; a site whose manifest is another kind, or whose value is None, is left out."""
        declared: dict[Any, list[str]] = {}
        for folder in self.folders:
            read = self._manifest(folder)
            found = value(*read) if read is not None else None
            if found is not None:
                declared.setdefault(found, []).append(folder.name)
        return declared


def _task(manifest: Path, raw: dict[str, Any]) -> str | None:
    task = raw["task"]
    if task is not None and (not isinstance(task, str) or task not in TASK_NAMES):
        raise SiteDataError(
            f"{manifest}: task {task!r} is not one of {', '.join(TASK_NAMES)}; correct it, "
            "or pass the run's --task"
        )
    return task


def _classes(raw: dict[str, Any]) -> tuple[str, ...] | None:
    """None also for labels not keyed by index: load_site names the file."""
    classes = declared_classes(raw["labels"])
    return None if classes is None else tuple(classes)
