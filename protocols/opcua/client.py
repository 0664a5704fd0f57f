"""The asyncua client of a shared session, whose watchdog counts any answer as alive.

asyncua's connection supervisor reads the server's state every watchdog interval and
drops the connection when that read is not answered within the interval. A session
shared by hundreds of devices has many requests in flight, and servers answer a session's
requests in order, so the probe waits behind all of them (a poll the agent gave up on is
still answered): a server that is busy but answering would be dropped, taking every
device of the session offline together, and their reconnects would load it further.
Here an answer to any request (``fastread.exchange`` notes it) is the sign of life; the
probe is sent only when the server answered nothing for a whole interval, so a server
that stops answering is still found out within two intervals.

This overrides asyncua 2.1's ``Client._wait_for_health_signal``; pyproject pins asyncua
to 2.1.x.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from asyncua import Client
from asyncua.client.ua_client import UaClientState

__all__ = ["LiveClient"]


class LiveClient(Client):  # type: ignore[misc]
    """An asyncua ``Client`` that probes its server only when it has gone quiet."""

    answered: float = 0.0  # monotonic time of the server's last answer to a request
    probes: int = 0  # server-state reads the watchdog sent

    def saw_answer(self) -> None:
        """The server answered a request just now."""
        self.answered = time.monotonic()

    async def _wait_for_health_signal(self) -> None:
        """Wait for a state change or the next tick; probe if nothing was answered since."""
        interval = float(self._watchdog_intervall)
        async with self.uaclient.subscribe_state() as sub:
            with contextlib.suppress(TimeoutError):
                await sub.next_change(interval)
        if self.uaclient.state is not UaClientState.CONNECTED:
            return
        if time.monotonic() - self.answered < interval:
            return
        self.probes += 1
        limit = min(self.session_timeout / 1000 / 2, interval)
        await asyncio.wait_for(self.nodes.server_state.read_value(), timeout=limit)
        self.saw_answer()
