"""The classes a federation's site folders declare, for a run that names none.

A researcher pointing `medfed simulate --data` at real site folders should
not have to repeat in `class-names` what every site's dataset.json already
says; sites that disagree are named, since no one run can fit them all.
"""

from __future__ import annotations

from pathlib import Path

from medfed.client.data.manifest import (
    MANIFEST_JSON,
    SiteDataError,
    declared_classes,
    find_manifest,
    read_rows,
)


def sites_classes(folders: list[Path]) -> list[str] | None:
    """The classes that every site declaring labels in its dataset.json declares alike;
    None when no site declares any (CSV and .npz manifests never do).

    Raises SiteDataError naming each site and its classes when they disagree.
    """
    declared: dict[tuple[str, ...], list[str]] = {}
    for folder in folders:
        manifest = find_manifest(folder)
        if manifest.name != MANIFEST_JSON:
            continue
        classes = declared_classes(read_rows(manifest)["labels"])
        if classes is not None:  # labels not keyed by index: load_site names the file
            declared.setdefault(tuple(classes), []).append(folder.name)
    if len(declared) > 1:
        groups = "; ".join(f"{', '.join(s)}: [{', '.join(c)}]" for c, s in declared.items())
        raise SiteDataError(
            f"the sites' dataset.json declare different labels ({groups}); make them agree, "
            "or set the run's classes (config key 'class-names')"
        )
    return list(next(iter(declared))) if declared else None
