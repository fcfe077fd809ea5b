"""How often the coordinator pulls replies: late by a bounded fraction, never hammering."""

from hypothesis import given
from hypothesis import strategies as st

from medfed.server.run.exchange import FIRST_POLL, LONGEST_POLL, POLL_FRACTION, poll_pause


@given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
def test_a_reply_is_picked_up_at_most_a_fraction_of_the_wait_late(waited: float) -> None:
    pause = poll_pause(waited)
    assert FIRST_POLL <= pause <= LONGEST_POLL
    assert pause <= max(FIRST_POLL, POLL_FRACTION * waited)


def test_long_waits_pull_at_the_longest_interval_not_faster() -> None:
    # a deployed round of minutes must not pull the SuperLink 20 times a second
    assert poll_pause(3600.0) == LONGEST_POLL
    assert poll_pause(0.0) == FIRST_POLL
