"""The pace of requests: a ceiling the user sets, and the rate the API lets through, learnt as we go.

Alibaba Cloud's gateway meters requests per access key and answers those over its quota with
``Throttling.User``. Throttling is the server's pace, not an error: retrying each throttled request
on its own backoff keeps the run throttled and can exhaust an instance's attempts. Instead every
request of a run passes one pacer, which spaces requests ``1 / rate`` apart:

* no rate at first (requests go as fast as the workers send them), or ``max_requests_per_second``
  when the account's quota is shared with other tools;
* on a throttled answer, the rate becomes a little under what the server let through in the last
  second (multiplicative decrease), and further throttles within that second, answers to requests
  already in flight, do not cut it again;
* while nothing is throttled, the rate creeps up a few percent a second (additive probing), so a
  quota that grows, or a first estimate that was low, is found again.

The state lives in shared memory created before reading processes are forked, so the loader and its
reading processes pace together: one account, one pace.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

# Slots of the shared state (doubles): the pace, and the answers let through in the current and the
# previous whole second (every process's: a reading process sees only its share of them).
_NEXT_SLOT, _RATE, _COOL_UNTIL, _PROBED_AT, _FLOOR, _SECOND, _THIS_SECOND, _LAST_SECOND = range(8)

DECREASE = 0.9  # the new rate, as a share of what the server let through
PROBE_PER_SECOND = 0.03  # how fast the rate creeps up while nothing is throttled
WINDOW_SECONDS = 1.0  # how far back "what the server let through" looks
MIN_RATE = 0.5  # requests per second, whatever happens
MIN_EVIDENCE = 5  # successes in the window before a rate is learnt from them
FLOOR_SHARE = 0.5  # the rate never drops below this share of the first rate learnt


class FlowControl:
    """One run's pacer. ``before_request`` waits for the request's slot; ``on_success`` and
    ``on_throttle`` report the answer."""

    def __init__(
        self,
        max_requests_per_second: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ceiling = float(max_requests_per_second) if max_requests_per_second else None
        self._clock = clock
        self._sleep = sleep
        # Shared with forked reading processes (CLOCK_MONOTONIC is the same for every process).
        self._state = multiprocessing.RawArray("d", 8)
        self._lock = multiprocessing.Lock()
        self._state[_RATE] = self.ceiling or 0.0
        self.throttled = 0  # answers throttled in this process
        self.waited_seconds = 0.0

    @property
    def rate(self) -> float | None:
        """The current pace in requests per second (None: unpaced)."""
        return self._state[_RATE] or None

    def before_request(self) -> None:
        """Wait for this request's slot when the run is paced."""
        if self._state[_RATE] <= 0:  # unpaced (the usual case): no lock on the request path
            return
        with self._lock:
            rate = self._state[_RATE]
            if rate <= 0:
                return
            now = self._clock()
            self._probe(now)
            rate = self._state[_RATE]
            slot = max(now, self._state[_NEXT_SLOT])
            self._state[_NEXT_SLOT] = slot + 1.0 / rate
        wait = slot - now
        if wait > 0:
            self.waited_seconds += wait
            self._sleep(wait)

    def on_success(self) -> None:
        now = self._clock()
        with self._lock:
            self._roll(now)
            self._state[_THIS_SECOND] += 1

    def _roll(self, now: float) -> None:
        """Move the per-second success counts on to the second ``now`` is in (lock held)."""
        second = float(int(now))
        if second != self._state[_SECOND]:
            recent = self._state[_THIS_SECOND] if second == self._state[_SECOND] + 1 else 0.0
            self._state[_LAST_SECOND] = recent
            self._state[_THIS_SECOND] = 0.0
            self._state[_SECOND] = second

    def _let_through(self, now: float) -> float:
        """Answers let through in the last second, every process's (lock held)."""
        self._roll(now)
        elapsed = now - self._state[_SECOND]  # of the current second
        return self._state[_THIS_SECOND] + self._state[_LAST_SECOND] * (1.0 - elapsed)

    def on_throttle(self) -> None:
        """The server refused a request for its rate: slow down, once per window.

        The new rate is a little under what the server let through in the last second. Without
        enough successes to tell (the very first requests), a paced run halves its rate and an
        unpaced one waits for evidence. Throttles that come at random rather than from a rate
        (a loaded gateway) would otherwise ratchet the rate down for ever: it never drops below
        half the first rate learnt."""
        now = self._clock()
        self.throttled += 1
        with self._lock:
            let_through = self._let_through(now)
            if now < self._state[_COOL_UNTIL]:
                return  # an answer to a request sent before the last cut
            current = self._state[_RATE]
            if let_through >= MIN_EVIDENCE:
                learnt = DECREASE * let_through / WINDOW_SECONDS
                rate = min(current * DECREASE, learnt) if current > 0 else learnt
                if self._state[_FLOOR] <= 0:
                    self._state[_FLOOR] = FLOOR_SHARE * rate
            elif current > 0:
                rate = current / 2
            else:
                return
            rate = max(rate, self._state[_FLOOR], MIN_RATE)
            if self.ceiling:
                rate = min(rate, self.ceiling)
            self._state[_RATE] = rate
            self._state[_NEXT_SLOT] = max(self._state[_NEXT_SLOT], now + 1.0 / rate)
            self._state[_COOL_UNTIL] = now + WINDOW_SECONDS
            self._state[_PROBED_AT] = now

    def _probe(self, now: float) -> None:
        """Additive increase, a few percent a second since the last change (lock held)."""
        if now < self._state[_COOL_UNTIL]:
            return
        since = now - (self._state[_PROBED_AT] or now)
        if since <= 0:
            self._state[_PROBED_AT] = now
            return
        rate = self._state[_RATE] * (1.0 + PROBE_PER_SECOND * since)
        if self.ceiling:
            rate = min(rate, self.ceiling)
        self._state[_RATE] = rate
        self._state[_PROBED_AT] = now
