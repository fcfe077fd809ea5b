"""The coordinator side: a Flower ServerApp running medfed's round loop.

Only the ServerApp object lives here; the run itself (server/run/federated_run.py,
with torch, MONAI and matplotlib: about 3 s to import) is imported when a run
starts. Flower loads the ServerApp and the ClientApp under one lock, and a
simulation starts its hospitals' workers only once both are loaded: a light
module lets Ray start while the coordinator imports.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One federated run; its folder tells the outcome however the run ends."""
    from medfed.server.run.federated_run import run

    run(grid, context)
