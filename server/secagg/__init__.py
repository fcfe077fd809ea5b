"""SecAgg+ on the coordinator: the workflow of a secure round, its replies, the unmasking.

`workflow` drives the stages through the run's exchange, `stage_replies` parses
and checks each stage's records, `unmasking` plans the neighbour graph and
removes the masks from the sum, `stats` is what the run record keeps.
"""
