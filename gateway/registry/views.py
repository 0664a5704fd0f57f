"""Published views of the device index, and answers to live queries kept per view.

A query counts over an ``IndexView``, never over the index itself, so it neither holds
nor waits for the registry's lock while it counts. The registry takes a view under its
lock (a few milliseconds: a copy of the columns ingest moves) and publishes it here.
Queries at the current time ("live") take the latest view while it is younger than
``max_age`` and no API write came after it; the registry replaces it in the background
before that, and answers over the new view, before publishing it, the live queries asked
since the latest was published (``ViewBoard.warm``): a query asked more often than views
are published is then a lookup, and one asked less often costs what it did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from gateway.registry.index import DeviceIndex, IndexView

__all__ = ["AnswerCache", "ViewBoard"]

log = logging.getLogger("iiot.gateway.registry")

# Wall time one publication may spend answering ahead; the rest are answered when asked.
_WARM_BUDGET_S = 0.5

Answer = Callable[[IndexView], Any]


class AnswerCache:
    """Answers by (query, view generation), each with how to answer it over another view.

    A query keeps its answers over the two latest views it was answered over: the one
    queries count over now, and the one being answered ahead before it is published.
    Bounded: past ``size`` queries, the one asked longest ago goes first.
    """

    def __init__(self, counters: Counter[str], size: int = 256) -> None:
        self._size = size
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()
        self._counters = counters

    def get(self, key: Hashable, generation: int) -> Any:
        """The answer to ``key`` over view ``generation``; None if there is none."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.asked = time.monotonic()
            return entry.answers.get(generation)

    def put(self, key: Hashable, generation: int, answer: Any, again: Answer) -> None:
        """Keep ``answer`` to ``key`` over view ``generation``; ``again`` answers it over
        another view (see ``warm``)."""
        with self._lock:
            entries = self._entries
            entry = entries.get(key)
            if entry is None:
                while len(entries) >= self._size:
                    oldest = min(entries, key=lambda k: entries[k].asked)
                    del entries[oldest]
                entry = entries[key] = _Entry(again)
            entry.asked = time.monotonic()
            entry.keep(generation, answer)

    def asked_since(self, since: float) -> bool:
        """Whether any live query was asked since ``since`` (``time.monotonic()``)."""
        with self._lock:
            return any(entry.asked >= since for entry in self._entries.values())

    def warm(self, view: IndexView, since: float) -> int:
        """Answer over ``view`` the queries asked since ``since``, latest asked first, for
        at most ``_WARM_BUDGET_S``; returns how many."""
        began = time.monotonic()
        with self._lock:
            asked = sorted(
                ((entry.asked, key, entry.again) for key, entry in self._entries.items()),
                key=lambda item: -item[0],
            )
        done = 0
        for when, key, again in asked:
            if when < since or time.monotonic() - began > _WARM_BUDGET_S:
                break
            try:
                answer = again(view)
            except Exception:
                # Counted and dropped: the query is answered when asked, as any other.
                self._counters["answer_ahead_errors"] += 1
                log.exception("answering a live query ahead failed", extra={"query": str(key)})
                with self._lock:
                    self._entries.pop(key, None)
                continue
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.keep(view.generation, answer)
            done += 1
        self._counters["answers_ahead"] += done
        return done


class _Entry:
    """A query's answers by view generation (the two latest), how to answer it again,
    and when it was last asked (``time.monotonic()``)."""

    __slots__ = ("again", "answers", "asked")

    def __init__(self, again: Answer) -> None:
        self.again = again
        self.answers: dict[int, Any] = {}
        self.asked = 0.0

    def keep(self, generation: int, answer: Any) -> None:
        self.answers[generation] = answer
        if len(self.answers) > 2:
            del self.answers[min(self.answers)]


class ViewBoard:
    """The latest published view, its answers, and which view a live query may use."""

    def __init__(self, max_age: float, counters: Counter[str]) -> None:
        self.max_age = max_age
        self.answers = AnswerCache(counters)
        self._generation = 0
        # The latest view and the registry's API-write count when it was taken.
        self._latest: tuple[IndexView, int] | None = None
        self._lock = threading.Lock()

    def take(self, index: DeviceIndex) -> IndexView:
        """A new view of ``index`` (call under the registry's lock)."""
        self._generation += 1
        latest = self._latest
        return IndexView(index, self._generation, latest[0] if latest else None)

    def warm(self, view: IndexView) -> int:
        """Answer over ``view`` the live queries asked since the latest was published."""
        latest = self._latest
        return self.answers.warm(view, latest[0].taken if latest else view.taken)

    def asked(self) -> bool:
        """Whether a live query was asked since the latest view was published."""
        latest = self._latest
        return latest is not None and self.answers.asked_since(latest[0].taken)

    def publish(self, view: IndexView, writes: int) -> None:
        """Make ``view`` the latest unless a newer one is already."""
        with self._lock:
            if self._latest is None or view.generation > self._latest[0].generation:
                self._latest = (view, writes)

    def live(self, writes: int) -> IndexView | None:
        """The latest view if a live query may count over it: younger than ``max_age``
        and no API write (``writes``: the registry's count now) came after it."""
        latest = self._latest
        if latest is None or latest[1] != writes:
            return None
        return latest[0] if time.monotonic() - latest[0].taken < self.max_age else None

    def age(self) -> float | None:
        """Seconds since the latest view was taken (None: none yet)."""
        latest = self._latest
        return None if latest is None else time.monotonic() - latest[0].taken
