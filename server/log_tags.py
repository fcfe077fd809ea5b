"""The tags that mark the ServerApp's log lines for `medfed simulate`, in one place.

The run (server/run/) writes them into the ServerApp's log; the simulation's
live view (server/simulation/progress.py) picks its lines out of Flower's
stream by them. A tag changed on one side only would leave the view blank.
"""

# A human progress line (RunOutputs.progress) and a machine-readable round event.
PROGRESS_TAG = "[medfed]"
ROUND_EVENT_TAG = "[medfed-round]"
# The last line of a ServerApp whose run completed: its records and audit are written, and
# its report too unless `medfed simulate` writes it next. What Flower does after it
# (stopping Ray, handing the run's logs to the SuperLink) takes seconds.
RUN_END_TAG = "[medfed-end]"
