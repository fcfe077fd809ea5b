"""The consortium's coordinator: its SuperLink behind a proxy, certificates, operator link.

`start` runs `medfed coordinator start` (and admits hospitals, pulls runs);
`certificates` makes the consortium's CA and keys; `proxy` writes the nginx
that gives each API to its role; `operator_link` and `operator_run` are the
operator's local link and `medfed operator run`.
"""
