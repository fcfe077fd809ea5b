"""What medfed simulate prints: plain round lines in logs, a live table on a terminal."""

import json

from medfed.server.simulation.progress import RoundView, run_ended

EVENT = {"round": 1, "rounds": 2, "replied": 3, "failed": 0, "seconds": 1.5,
         "train-loss": 0.9, "metric": "dice", "value": 0.42, "loss": 0.8}  # fmt: skip
LINES = [
    "INFO :      [medfed] site statistics (counts below the minimum ...):\n",
    f"INFO :      [medfed-round] {json.dumps(EVENT)}\n",
    "INFO :      [medfed] round 1/2 | sites 3/3 | train-loss 0.9000 | val dice 0.4200\n",
    "INFO :      configure_train: Sampled 3 nodes (out of 3)\n",
]


def feed(view: RoundView) -> RoundView:
    for line in LINES:
        view.line(line)
    return view


def test_logs_get_plain_lines_only(capsys):
    with RoundView(interactive=False) as view:
        feed(view)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "site statistics (counts below the minimum ...):",
        "round 1/2 | sites 3/3 | train-loss 0.9000 | val dice 0.4200",
    ]


def test_terminal_gets_a_table_row_per_round(capsys):
    with RoundView(interactive=True) as view:
        assert feed(view).table.row_count == 1
        cells = [column._cells[0] for column in view.table.columns]
    assert cells == ["1/2", "3", "0", "0.9000", "dice 0.4200", "0.8000", "1.5"]
    assert "round 1/2 | sites" not in capsys.readouterr().out


def test_verbose_passes_everything_through(capsys):
    with RoundView(verbose=True, interactive=True) as view:
        feed(view)
    assert capsys.readouterr().out == "".join(LINES)


def test_only_the_serverapps_end_line_ends_the_stream():
    assert run_ended("INFO :      [medfed-end] /runs/7\n")
    for line in ("INFO :      [medfed] wrote report.md and plots/ in /runs/7\n",
                 'INFO :      [medfed-round] {"round": 2}\n', "medfed-end\n"):  # fmt: skip
        assert not run_ended(line)
