"""A host's reading of an edge node's seq: held-back messages are late, lost ones are gaps."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocols.mqtt.sparkplug.seq import DEFAULT_WINDOW, SeqWindow


def _feed(w: SeqWindow, seqs: list[int]) -> int:
    return sum(w.see(s) for s in seqs)


def test_in_order_messages_across_the_wrap_are_no_gap() -> None:
    w = SeqWindow()
    assert w.start(0) == 0
    assert _feed(w, [s % 256 for s in range(1, 600)]) == 0
    assert (w.late, w.stray, w.missed, w.pending) == (0, 0, 0, 0)


def test_ddata_held_back_behind_a_qos0_birth_is_late_not_a_gap() -> None:
    # seq 10 and 11 (DDATA, QoS 1) wait in the client's queue; DBIRTH 12 (QoS 0) goes first.
    w = SeqWindow()
    w.start(0)
    assert _feed(w, list(range(1, 10))) == 0
    assert _feed(w, [12, 10, 11, 13, 14]) == 0
    assert w.late == 2 and w.pending == 0
    assert _feed(w, list(range(15, 15 + 2 * DEFAULT_WINDOW))) == 0
    assert w.end() == 0 and w.missed == 0


def test_held_back_messages_around_the_wrap_are_late() -> None:
    w = SeqWindow()
    w.start(0)
    _feed(w, list(range(1, 254)))
    assert _feed(w, [1, 2, 254, 255, 0, 3]) == 0  # 254, 255, 0 overtaken by 1 and 2
    assert w.late == 3 and w.pending == 0 and w.stray == 0


def test_a_lost_message_is_one_gap_once_the_window_passes_it() -> None:
    w = SeqWindow()
    w.start(0)
    _feed(w, [1, 2])
    assert w.see(5) == 0  # 3 and 4 may still come
    assert w.pending == 2
    assert _feed(w, list(range(6, 3 + DEFAULT_WINDOW))) == 0
    assert w.see(3 + DEFAULT_WINDOW) == 1  # one gap, however many numbers it lacks
    assert w.missed == 2 and w.pending == 0
    assert w.see(3) == 0 and w.stray == 1  # too late: already counted, not counted again


def test_a_partly_filled_run_is_still_one_gap() -> None:
    w = SeqWindow()
    w.start(0)
    _feed(w, [1, 5, 3])
    assert w.late == 1 and w.pending == 2
    assert w.end() == 1 and w.missed == 2


def test_what_is_missing_when_the_session_ends_is_a_gap() -> None:
    w = SeqWindow()
    w.start(0)
    _feed(w, [1, 2, 4])
    assert w.start(0) == 1  # a new NBIRTH: 3 never came in the old session
    assert w.see(1) == 0 and w.pending == 0


def test_repeats_are_strays_not_gaps() -> None:
    w = SeqWindow()
    w.start(0)
    assert _feed(w, [1, 2, 2, 1, 3]) == 0
    assert w.stray == 2 and w.late == 0


def test_the_first_seq_heard_without_a_birth_starts_the_count() -> None:
    w = SeqWindow()
    assert _feed(w, [77, 78, 80, 79]) == 0
    assert w.late == 1


def test_the_window_must_stay_under_half_the_seq_space() -> None:
    with pytest.raises(ValueError, match="window"):
        SeqWindow(128)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(10, 600),
    lost=st.sets(st.integers(1, 599), max_size=20),
    hold=st.lists(st.tuples(st.integers(1, 599), st.integers(1, 20)), max_size=10),
)
def test_each_jump_that_lacks_a_number_for_good_is_one_gap(
    n: int, lost: set[int], hold: list[tuple[int, int]]
) -> None:
    """Messages held back within the window reorder; only jumps with lost numbers are gaps."""
    order = [i for i in range(1, n) if i not in lost]
    for at, by in hold:
        if at in order:
            i = order.index(at)
            order.insert(min(i + by, len(order)), order.pop(i))
    # How far behind the newest number each one arrives; with a run of lost numbers before
    # it (up to 20), that stays inside the window.
    newest = lateness = 0
    for i in order:
        lateness, newest = max(lateness, newest - i), max(newest, i)
    assume(lateness + 21 < DEFAULT_WINDOW)
    w = SeqWindow()
    w.start(0)
    gaps = _feed(w, [i % 256 for i in order]) + w.end()
    # Each time the newest number jumps ahead, the numbers it skips are one run; a run with
    # a number that never arrives is one gap, however many it lacks and however late the
    # others came. A number lost after the last one that arrived leaves no trace in seq:
    # only NDEATH follows, and it carries bdSeq.
    jumps_lacking = newest = 0
    for i in order:
        if i > newest:
            jumps_lacking += any(j in lost for j in range(newest + 1, i))
            newest = i
    assert gaps == jumps_lacking
    assert w.missed == sum(1 for i in lost if i < newest)
