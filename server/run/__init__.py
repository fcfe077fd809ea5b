"""The run: one federated run inside the ServerApp, from its first round to its record.

`federated_run` (the ServerApp's main) builds the strategy and the record and
hands the rounds to `round_loop`; each round goes out through `exchange`
(transport) and comes back sorted by `replies`; `round_outputs` sends each
finished round to `run_record` (the folder on disk), Prometheus, the audit
log and the progress log. Nothing here knows what started the run: a
simulation, a coordinator or `flwr run`.
"""
