"""The cursor, the paging policy and the retry backoff on their own, without the network.

The pipeline tests exercise these through the emulator; here each rule is stated directly, with
numbers a reader can check by hand, so a change in one of them fails a test named after it.
"""

from __future__ import annotations

import random

import pytest
from opensearch_tasks.client import RetryPolicy
from opensearch_tasks.cursor import CursorUpdate, InstanceCursor, to_filter_value
from opensearch_tasks.helpers import InstanceReport, ListingError, Paging, ReadOptions, RowSelection
from opensearch_tasks.records import Target, total_count

HOUR = 3_600_000
NOW = 1_000 * HOUR  # an arbitrary "now" in epoch ms
STALE = 24 * HOUR


# --- the cursor ----------------------------------------------------------------------------------


def test_a_first_load_reads_the_whole_history():
    assert InstanceCursor().window_start_ms(NOW, STALE) is None


def test_the_window_starts_at_the_newest_start_seen():
    cursor = InstanceCursor(max_start_ms=NOW - 5 * HOUR)
    assert cursor.window_start_ms(NOW, STALE) == NOW - 5 * HOUR


def test_an_open_task_holds_the_window_back_to_its_start():
    cursor = InstanceCursor(max_start_ms=NOW - HOUR, open={"r1": NOW - 10 * HOUR})
    assert cursor.window_start_ms(NOW, STALE) == NOW - 10 * HOUR


@pytest.mark.parametrize("status", ["running", "queued", None])
def test_a_task_without_a_final_status_stays_open_and_is_read_again(status):
    """Only ``success`` and ``failed`` are final: a ``queued`` task stored as final would keep that
    status for ever."""
    update = CursorUpdate(InstanceCursor())
    update.see("done", NOW - 3 * HOUR, "success", False, "1")
    update.see("waiting", NOW - 2 * HOUR, status, False, "2")
    update.see("new", NOW - HOUR, "failed", False, "3")
    cursor, _ = update.result(NOW, STALE)
    assert cursor.open == {"waiting": NOW - 2 * HOUR}
    assert cursor.window_start_ms(NOW, STALE) == NOW - 2 * HOUR


def test_an_open_task_past_the_stale_horizon_no_longer_holds_the_window():
    cursor = InstanceCursor(max_start_ms=NOW - HOUR, open={"old": NOW - 30 * HOUR})
    assert cursor.window_start_ms(NOW, STALE) == NOW - HOUR


def test_lookback_reads_that_much_before_the_newest_start():
    cursor = InstanceCursor(max_start_ms=NOW - HOUR)
    assert cursor.window_start_ms(NOW, STALE, lookback_ms=2 * HOUR) == NOW - 3 * HOUR


def test_the_filter_asks_for_tasks_started_after_one_unit_before_the_window():
    assert to_filter_value(1_700_000_000_000, "ms") == 1_699_999_999_999
    assert to_filter_value(1_700_000_000_000, None) == 1_699_999_999_999
    assert to_filter_value(1_700_000_000_000, "s") == 1_699_999_999


def test_known_final_tasks_are_those_before_the_newest_start_or_at_it_and_stored():
    cursor = InstanceCursor(max_start_ms=100, boundary={"at"}, open={"running": 50})
    assert cursor.is_known_final("older", 99)
    assert cursor.is_known_final("at", 100)
    assert not cursor.is_known_final("other-at-max", 100)  # same start, never stored
    assert not cursor.is_known_final("newer", 101)
    assert not cursor.is_known_final("running", 50)  # open tasks are read again
    assert cursor.is_new("newer", 101) and cursor.is_new("other-at-max", 100)
    assert not cursor.is_new("running", 50) and not cursor.is_new("older", 99)


def test_state_round_trips():
    cursor = InstanceCursor(max_start_ms=7, boundary={"b", "a"}, open={"x": 3}, unit="s")
    assert InstanceCursor.from_state(cursor.to_state()) == cursor
    assert InstanceCursor.from_state(None) == InstanceCursor()


def test_an_update_moves_the_cursor_to_what_it_saw():
    update = CursorUpdate(InstanceCursor(max_start_ms=100, boundary={"a"}, open={"r": 90}))
    update.see("r", 90, "success", seconds=False)  # the open task finished
    update.see("n1", 120, "running", seconds=False)
    update.see("n2", 120, "success", seconds=False)
    cursor, went_stale = update.result(now_ms=200, stale_after_ms=1_000)
    assert cursor.max_start_ms == 120
    assert cursor.boundary == {"n1", "n2"}
    assert cursor.open == {"n1": 120}  # "r" finished, so it is no longer open
    assert cursor.unit == "ms"
    assert went_stale == 0


def test_the_stale_horizon_lets_go_of_a_task_that_later_finishes():
    """Run 1 sees a task running; it is older than the horizon by run 2, which stops re-reading it
    (the window moves past it); when it finishes later, a lookback run picks the final state up."""
    opened = CursorUpdate(InstanceCursor())
    opened.see("slow", NOW - 2 * STALE, "running", seconds=False)
    opened.see("fresh", NOW - HOUR, "success", seconds=False)
    cursor, _ = opened.result(now_ms=NOW - 2 * STALE + HOUR, stale_after_ms=STALE)
    assert cursor.open == {"slow": NOW - 2 * STALE}
    assert cursor.window_start_ms(NOW - 2 * STALE + HOUR, STALE) == NOW - 2 * STALE  # held back

    # a day later the task is past the horizon: the window no longer waits for it
    assert cursor.window_start_ms(NOW, STALE) == NOW - HOUR
    later = CursorUpdate(cursor)
    later.see("fresh", NOW - HOUR, "success", seconds=False)  # "slow" is outside the window
    after, went_stale = later.result(now_ms=NOW, stale_after_ms=STALE)
    assert went_stale == 1
    assert after.open == {}
    assert after.is_known_final("slow", NOW - 2 * STALE)  # not written again by default
    assert not after.is_new("slow", NOW - 2 * STALE)


def test_seconds_from_the_api_make_the_cursor_speak_seconds():
    update = CursorUpdate(InstanceCursor())
    update.see("a", 1_700_000_000_000, "success", seconds=True)
    cursor, _ = update.result(now_ms=NOW, stale_after_ms=STALE)
    assert cursor.unit == "s"


# --- the retry backoff ---------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_full_jitter_and_is_capped():
    policy = RetryPolicy(base_seconds=0.5, max_seconds=4.0)
    random.seed(1)
    for attempt, cap in ((0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (10, 4.0)):
        delays = [policy.delay(attempt) for _ in range(300)]
        assert all(0 <= d <= cap for d in delays), (attempt, max(delays))
        assert max(delays) > 0.9 * cap, f"attempt {attempt}: the jitter never reaches its cap {cap}"
        assert min(delays) < 0.1 * cap, f"attempt {attempt}: no full jitter down to 0"


def test_a_server_hint_longer_than_the_backoff_wins_up_to_the_cap():
    policy = RetryPolicy(base_seconds=0.25, max_seconds=30.0)
    assert policy.delay(0, hint_seconds=5.0) == 5.0
    assert policy.delay(0, hint_seconds=120.0) == 30.0
    random.seed(2)
    with_small_hint = [policy.delay(6, hint_seconds=0.001) for _ in range(200)]
    assert max(with_small_hint) > 1.0  # a tiny hint does not shorten the backoff


# --- the paging policy ---------------------------------------------------------------------------


def _options(**overrides: int | None) -> ReadOptions:
    values: dict[str, int | None] = {"page_size": 10, "stale_after_ms": STALE, "max_page_size": 100}
    values.update(overrides)
    return ReadOptions(**values)  # type: ignore[arg-type]


def test_a_first_load_pages_large_and_an_incremental_run_pages_by_the_configured_size():
    assert Paging.start(_options(), InstanceCursor()).next_request() == (1, 100)
    assert Paging.start(_options(), InstanceCursor(max_start_ms=5)).next_request() == (1, 10)
    backfill = Paging.start(_options(since_ms=1), InstanceCursor(max_start_ms=5))
    assert backfill.next_request() == (1, 100)


def test_a_deep_incremental_listing_switches_to_large_pages_from_page_one():
    paging = Paging.start(_options(), InstanceCursor(max_start_ms=5))
    paging.next_request()
    paging.count(250)
    assert paging.after_page(items=10, shifted=False) == "deep"
    assert paging.next_request() == (1, 100)


def test_a_short_page_ends_the_listing():
    paging = Paging.start(_options(), InstanceCursor(max_start_ms=5))
    paging.next_request()
    paging.count(7)
    assert paging.after_page(items=7, shifted=False) == "done"


def test_a_server_capping_the_large_size_is_read_again_from_page_one_at_its_cap():
    paging = Paging.start(_options(), InstanceCursor())
    paging.next_request()
    paging.count(500)
    assert paging.after_page(items=50, shifted=False) == "capped"  # asked 100, got 50 of 500
    assert paging.next_request() == (1, 50)
    paging.count(500)
    assert paging.after_page(items=50, shifted=False) == "next"
    assert paging.next_request() == (2, 50)


def test_a_cap_below_the_configured_size_is_followed_too_and_not_learnt():
    """Asked 10 (an incremental run), got 4 while the server counts 30: pages of 4 from page 1.
    The configured size is the user's; only the instance that met the cap reads below it."""
    options = _options()
    paging = Paging.start(options, InstanceCursor(max_start_ms=5))
    assert paging.next_request() == (1, 10)
    paging.count(30)
    assert paging.after_page(items=4, shifted=False) == "capped"
    assert paging.next_request() == (1, 4)
    for page in range(1, 8):
        paging.count(30)
        step = paging.after_page(items=4, shifted=False)
        assert step == "next"
        assert paging.next_request() == (page + 1, 4)
    paging.count(30)
    assert paging.after_page(items=2, shifted=False) == "done"  # 7 x 4 + 2 = 30: the end
    assert "page_size_cap" not in options.learnt
    assert Paging.start(options, InstanceCursor(max_start_ms=5)).next_request() == (1, 10)


def test_a_capped_listing_that_shifts_stays_at_the_cap():
    """Larger pages would only be capped again (and read from page 1 again): none are asked for."""
    paging = Paging.start(_options(), InstanceCursor(max_start_ms=5))
    paging.next_request()
    paging.count(30)
    assert paging.after_page(items=4, shifted=False) == "capped"
    assert paging.next_request() == (1, 4)
    paging.count(30)
    assert paging.after_page(items=4, shifted=False) == "next"
    assert paging.next_request() == (2, 4)
    assert paging.count(33)  # three tasks started while we paged
    assert paging.after_page(items=4, shifted=True) == "next"
    assert paging.next_request() == (3, 4)


def test_a_short_last_page_after_the_listing_shrank_is_the_end():
    """Tasks deleted while we paged: the first count said 300; the last page's own count says 240."""
    paging = Paging.start(_options(), InstanceCursor())  # a first load: pages of 100
    for _ in (1, 2):
        paging.next_request()
        paging.count(300)
        assert paging.after_page(items=100, shifted=False) == "next"
    paging.next_request()
    paging.count(240)
    assert paging.after_page(items=40, shifted=False) == "done"


def test_a_listing_that_shifts_while_read_continues_with_large_pages_from_an_overlapping_page():
    """A server that sends no ``totalCount``: the shift shows as a task read twice."""
    paging = Paging.start(_options(), InstanceCursor(max_start_ms=5))  # pages of 10 ...
    assert paging.next_request() == (1, 10)
    paging.count(None)
    assert paging.after_page(items=10, shifted=False) == "next"
    assert paging.next_request() == (2, 10)
    paging.count(None)  # three tasks started while we paged: page 2 repeats page 1's tail
    assert paging.after_page(items=10, shifted=True) == "next"
    assert paging.next_request() == (1, 100)  # tasks 1-100 cover 11-20 again: no gap


def test_a_full_page_that_reaches_the_servers_count_ends_the_listing():
    paging = Paging.start(_options(), InstanceCursor())  # a first load: pages of 100
    for page in range(1, 6):
        assert paging.next_request() == (page, 100)
        paging.count(500)
        step = paging.after_page(items=100, shifted=False)
    assert step == "done"  # no sixth request for a page that can only be empty


@pytest.mark.parametrize(
    ("value", "count"),
    [(12, 12), ("12", 12), ("many", None), (True, None), (-1, None), (None, None), ([3], None)],
)
def test_a_total_count_that_is_not_a_whole_number_is_no_count(value, count):
    """Paging then ends on a short page, as without a count, instead of failing the instance."""
    assert total_count({"totalCount": value}) == count
    assert total_count({"TotalCount": value}) == count


def test_a_full_page_past_the_servers_count_does_not_end_the_listing():
    """A count that is wrong (1, while a page holds 100) is not trusted to skip a request."""
    paging = Paging.start(_options(), InstanceCursor())
    paging.next_request()
    paging.count(1)
    assert paging.after_page(items=100, shifted=False) == "next"
    assert paging.next_request() == (2, 100)


def test_a_listing_growing_faster_than_it_is_read_fails_after_a_bounded_number_of_requests():
    paging = Paging.start(_options(), InstanceCursor(max_start_ms=5))
    total = 30
    with pytest.raises(ListingError, match="grew faster than it could be read"):
        for _ in range(1_000):
            paging.next_request()
            total += 10
            paging.count(total)
            paging.after_page(items=10, shifted=False)
    # the first count was 40 tasks, 4 pages of 10: the budget is 10 + 4 x 4 requests, then it fails
    assert paging.first_total == 40
    assert paging.pages_read == 10 + 4 * 4 + 1


# --- which rows of a page are kept ---------------------------------------------------------------


class _Page:
    def __init__(self, rows: list[tuple[str, int, str]]) -> None:
        self.run_id = [r[0] for r in rows]
        self.start_ms = [r[1] for r in rows]
        self.status = [r[2] for r in rows]
        self.seconds = [False] * len(rows)
        self.generation = [str(n) for n in range(len(rows))]


def _selection(cursor: InstanceCursor, **options: int | None) -> RowSelection:
    report = InstanceReport(Target("app", "ctr", "inst"))
    read = _options(**options)
    return RowSelection(cursor, read, cursor.window_start_ms(NOW, STALE), CursorUpdate(cursor), report)


def test_a_task_seen_twice_because_the_page_shifted_is_kept_once():
    selection = _selection(InstanceCursor())
    assert selection.keep(_Page([("a", 3, "success"), ("b", 2, "success")])) == [0, 1]
    assert selection.keep(_Page([("b", 2, "success"), ("c", 1, "success")])) == [1]
    assert selection.report.duplicates_skipped == 1
    assert selection.report.new == 3


def test_rows_read_again_on_purpose_are_not_counted_as_drift():
    selection = _selection(InstanceCursor())
    selection.keep(_Page([("a", 3, "success")]))
    selection.read_again()
    assert selection.keep(_Page([("a", 3, "success"), ("b", 2, "success")])) == [1]
    assert selection.report.duplicates_skipped == 0


def test_stored_final_tasks_and_rows_outside_the_window_are_dropped_open_ones_are_updates():
    cursor = InstanceCursor(max_start_ms=100, boundary={"at"}, open={"open": 100})
    selection = _selection(cursor)
    page = _Page([("new", 150, "running"), ("open", 100, "success"), ("at", 100, "success")])
    assert selection.keep(page) == [0, 1]
    lenient = _Page([("ignored-filter", 10, "success")])  # the server ignored startTime
    assert selection.keep(lenient) == []
    assert (selection.report.new, selection.report.updated, selection.report.running) == (1, 1, 1)


def test_a_backfill_keeps_its_window_and_leaves_the_cursor_alone():
    cursor = InstanceCursor(max_start_ms=100, boundary={"at"})
    selection = RowSelection(
        cursor,
        _options(since_ms=50, until_ms=90),
        50,
        CursorUpdate(cursor),
        InstanceReport(Target("a", "ctr", "i")),
    )
    page = _Page([("late", 95, "success"), ("in", 60, "success"), ("early", 40, "success")])
    assert selection.keep(page) == [1]
    assert selection.update.max_start_ms == 100 and selection.update.running == {}


def test_once_a_server_capped_a_page_the_next_instances_start_with_its_cap():
    options = _options(page_size=10, max_page_size=100)
    first = Paging.start(options, InstanceCursor())
    first.next_request()
    first.count(500)
    assert first.after_page(items=40, shifted=False) == "capped"
    later = Paging.start(options, InstanceCursor())  # another instance of the same run
    assert later.next_request() == (1, 40)
    assert Paging.start(_options(page_size=10, max_page_size=100), InstanceCursor()).next_request() == (
        1,
        100,
    )
