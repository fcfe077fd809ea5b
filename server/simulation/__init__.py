"""`medfed simulate`: a whole federation on this machine, with Flower's simulation engine.

`simulate` (the launcher) checks everything and starts a SuperLink and `flwr
run`; `ray_cluster` picks the Ray the hospitals run on; `progress` shows the
run's lines; `failed_start` retries a Ray that failed at start;
`settings_file` reads a pyproject's run settings; `flower_app` writes the app
folder `flwr run` packs.
"""
