"""A host's reading of one edge node's ``seq``: real gaps counted, late messages not.

Sparkplug numbers every message of a session (NBIRTH, DBIRTH, NDATA, DDATA, DDEATH)
0–255, wrapping. A message is numbered when it is built, not when it leaves: an edge
node's MQTT client holds QoS 1 messages (DDATA) back while its in-flight window is full
and sends a QoS 0 one (DBIRTH, DDEATH) at once, so a host may read seq 12 before 10
and 11. Those two are late, not lost.

So a seq past the next expected one opens a run of *missing* numbers instead of being
counted at once. A missing number that arrives later is taken out of its run; a run is a
gap (counted once, however many numbers it lacks) when the newest seq is ``window``
messages past its start and it still lacks one, or when the session ends (NBIRTH,
NDEATH) with it open. Numbers are kept unwrapped (a count since the session's first), a
seq being read as the nearer of the two positions it can stand for; the window stays
under half the seq space so that reading is never ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DEFAULT_WINDOW", "SeqWindow"]

DEFAULT_WINDOW = 64  # messages a late one may trail the newest by and still be on time
_SPACE = 256


@dataclass(slots=True)
class _Run:
    start: int  # unwrapped position of the first missing number
    missing: set[int] = field(default_factory=set)


class SeqWindow:
    """The seq positions of one node's session; ``see`` returns gaps that became final."""

    __slots__ = ("_high", "_runs", "late", "missed", "stray", "window")

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if not 0 < window < _SPACE // 2:
            raise ValueError(f"window {window} must be between 1 and {_SPACE // 2 - 1}")
        self.window = window
        self._high: int | None = None
        self._runs: list[_Run] = []
        self.late = 0  # messages that arrived after a later one, within the window
        self.stray = 0  # repeats, and numbers older than the window (already a gap)
        self.missed = 0  # numbers never received, in gaps made final

    @property
    def pending(self) -> int:
        """Numbers missing now that may still arrive."""
        return sum(len(r.missing) for r in self._runs)

    def start(self, seq: int) -> int:
        """A new session (NBIRTH) numbered from ``seq``; returns the old one's open gaps."""
        gaps = self.end()
        self._high = seq % _SPACE
        return gaps

    def end(self) -> int:
        """The session ended (NDEATH): what is still missing never comes; its gaps."""
        gaps = self._close(len(self._runs))
        self._high = None
        return gaps

    def see(self, seq: int) -> int:
        """Take one message's ``seq``; returns the gaps that became final with it."""
        seq %= _SPACE
        high = self._high
        if high is None:  # the first number heard of this session (a host restart)
            self._high = seq
            return 0
        ahead = (seq - high) % _SPACE
        if 0 < ahead < _SPACE // 2:
            if ahead > 1:
                self._runs.append(_Run(high + 1, set(range(high + 1, high + ahead))))
            self._high = high = high + ahead
            expired = 0
            for run in self._runs:
                if high - run.start < self.window:
                    break  # runs are in order of their start
                expired += 1
            return self._close(expired)
        self._arrived(high - (_SPACE - ahead) if ahead else high)
        return 0

    def _arrived(self, pos: int) -> None:
        """A number at or behind the newest: late if it was missing, a stray otherwise."""
        for i, run in enumerate(self._runs):
            if pos in run.missing:
                run.missing.discard(pos)
                if not run.missing:
                    del self._runs[i]
                self.late += 1
                return
        self.stray += 1

    def _close(self, count: int) -> int:
        """Make the first ``count`` runs final; each still lacking a number is one gap."""
        gaps = 0
        for run in self._runs[:count]:
            gaps += 1
            self.missed += len(run.missing)
        del self._runs[:count]
        return gaps
