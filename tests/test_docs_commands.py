"""Every `medfed` command the README and docs/ show parses as written (issue 25: a
newcomer follows them command by command; a renamed flag or subcommand must fail here,
not in their terminal)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medfed.server.cli import build_parser

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?medfed\s")
PLACEHOLDER = re.compile(r"<[^<>]+>")


def _code_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of each line in the page's ```bash blocks, with its
    continuation lines joined."""
    commands: list[tuple[int, str]] = []
    inside, fenced, pending, start = False, False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            inside, pending = fenced and line.strip() in ("```bash", "```sh"), ""
            continue
        if not inside:
            continue
        text = (pending + " " + line.strip()) if pending else line.strip()
        start = start if pending else number
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        commands.append((start, text))
    return commands


def _medfed_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, text in _code_lines(page):
            if not COMMAND.match(text) or re.search(r"\s\[-", text):  # a synopsis: [--opt ...]
                continue
            found.append((f"{page.relative_to(ROOT)}:{number}", text))
    return found


COMMANDS = _medfed_commands()


def test_the_docs_show_commands_for_every_role():
    shown = {text.split("medfed ", 1)[1].split()[0] for _, text in COMMANDS}
    assert {"simulate", "node", "coordinator", "certs", "operator", "data", "predict"} <= shown


@pytest.mark.parametrize(("where", "text"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, text):
    line = PLACEHOLDER.sub("X", text)  # <run-id>, <sha256>, <hash>: a value of the user's
    words = shlex.split(line, comments=True)
    words = words[: words.index(";")] if ";" in words else words
    words = [w.replace("$(date +%Y%m%d-%H%M%S)", "now") for w in words]
    while "=" in words[0]:  # OMP_NUM_THREADS=1 medfed ...: the environment, not an argument
        words = words[1:]
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as refused:
        pytest.fail(f"{where}: `{text}` does not parse (exit {refused.code})")


WALK_THROUGH_LEFTOVERS = [
    "certs/ca.key", "certs/operators/ops/ops.key", "keys/hospital-a/hospital-a.key",
    "state/coordinator/audit.jsonl", "data/site-0/dataset.json",
    "medfed.medfed.0-1-0.0123abcd.fab", "coordinator-state/audit.jsonl",
    "operator-state/link.json", "node-state/audit.jsonl", "node-keys/hospital-a.key",
    "runs/demo-20261207-101010/metrics.json", "my-bundle/configs/inference.json",
    "predictions/predictions.json", "new-studies/x.nii.gz",
]  # fmt: skip


def test_what_the_walk_throughs_leave_in_a_checkout_is_ignored_by_git():
    """Issue 25: docs/operator.md's one-machine walk-through left private keys, state
    folders and the .fab in the checkout, one `git add .` away from a commit."""
    import subprocess

    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *WALK_THROUGH_LEFTOVERS],
        cwd=ROOT, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert ignored == WALK_THROUGH_LEFTOVERS
    sources = [
        "tests/client/data/test_check.py",
        "docs/hospital.md",
        "server/coordinator/certificates.py",
    ]
    kept = subprocess.run(
        ["git", "check-ignore", "--no-index", *sources], cwd=ROOT, capture_output=True, text=True
    )
    assert kept.stdout == "", "a source file would be ignored"


def test_the_app_package_holds_the_checkouts_readme_not_one_made_below_it(tmp_path):
    """Issue 25: after `medfed export ... --out my-bundle/` (docs/researcher.md), `flwr build
    --app .` packed my-bundle/docs/README.md too, and the hash hospitals approve changed."""
    import shutil
    import subprocess
    import zipfile

    from medfed.shared_models.supervision import executable

    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, app / name)
    (app / "my-bundle" / "docs").mkdir(parents=True)
    (app / "my-bundle" / "docs" / "README.md").write_text("an exported bundle's own docs")
    built = subprocess.run([executable("flwr"), "build", "--app", str(app)], cwd=tmp_path,
                           capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (package,) = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(package).namelist()) - {".info/CONTENT"}
    assert names == {"pyproject.toml", "README.md"}
