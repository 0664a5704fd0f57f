"""Publish requests of one session, several in flight, and their answers decoded directly.

asyncua keeps one Publish request in flight per session and decodes every notification
through its generic struct machinery (a DataValue with two timestamps as datetimes, a
task per callback): at tens of thousands of values a second that, not the network, set
the pace, and a subscription the server could not publish for want of a request lost
values. Here a session keeps several requests in flight (``Publisher``), each answer's
DataChangeNotifications are decoded with ``struct`` (``decode_publish``; anything unusual
falls back to asyncua's decoder for that answer), and the acknowledgements ride on the
next request.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary

from protocols.opcua.fastread import SCALARS, STRING, exchange, type_id

__all__ = ["Notifications", "Publisher", "decode_publish", "encode_acks"]

_log = logging.getLogger(__name__)

_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_INT64 = struct.Struct("<q")
_ACK = struct.Struct("<II")
_PUBLISH_TYPE = type_id(ua.ObjectIds.PublishRequest_Encoding_DefaultBinary)
_PUBLISH_RESPONSE = ua.ObjectIds.PublishResponse_Encoding_DefaultBinary
_DATA_CHANGE = ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary
_STATUS_CHANGE = ua.ObjectIds.StatusChangeNotification_Encoding_DefaultBinary
_EPOCH_OFFSET = 116_444_736_000_000_000  # 1601-01-01 to 1970-01-01, in 100 ns

# A server answers these to one Publish request while the others carry on.
_RETRY = frozenset({ua.StatusCodes.BadTimeout, ua.StatusCodes.BadRequestTimeout})
# More requests in flight than the server keeps, or none of its subscriptions left.
_ENOUGH = frozenset({ua.StatusCodes.BadTooManyPublishRequests, ua.StatusCodes.BadNoSubscription})

# (client handle, raw value, status code, source time in ms since 1970 or 0)
Item = tuple[int, Any, int, int]


@dataclass(slots=True)
class Notifications:
    """One Publish answer: which subscription, its sequence number, and what it carried."""

    subscription_id: int
    sequence: int
    data: bool  # it carried notifications (to acknowledge), not a keep-alive
    items: list[Item] = field(default_factory=list)
    status: int | None = None  # a StatusChangeNotification's status


def encode_acks(acks: list[tuple[int, int]]) -> bytes:
    """A PublishRequest's parameters: its (subscription, sequence number) acknowledgements."""
    return _INT32.pack(len(acks)) + b"".join(_ACK.pack(s, n) for s, n in acks)


def decode_publish(raw: bytes, pos: int) -> Notifications | None:
    """A PublishResponse body after its header, or None where asyncua must decode it."""
    (sub_id,) = _UINT32.unpack_from(raw, pos)
    (n,) = _INT32.unpack_from(raw, pos + 4)
    pos += 8 + 4 * max(n, 0) + 1  # AvailableSequenceNumbers, MoreNotifications
    (seq,) = _UINT32.unpack_from(raw, pos)
    (count,) = _INT32.unpack_from(raw, pos + 12)  # after PublishTime
    pos += 16
    out = Notifications(sub_id, seq, count > 0)
    items = out.items
    scalars = SCALARS
    for _ in range(max(count, 0)):
        if raw[pos] != 0x01 or raw[pos + 4] != 0x01:  # four-byte type id, binary body
            return None
        kind = raw[pos + 2] | raw[pos + 3] << 8 if raw[pos + 1] == 0 else -1
        (length,) = _INT32.unpack_from(raw, pos + 5)
        body = pos + 9
        pos = body + length
        if kind == _STATUS_CHANGE:
            (out.status,) = _UINT32.unpack_from(raw, body)
            continue
        if kind != _DATA_CHANGE:
            continue  # events: no monitored item of the driver asks for them
        (m,) = _INT32.unpack_from(raw, body)
        p = body + 4
        for _ in range(max(m, 0)):
            (handle,) = _UINT32.unpack_from(raw, p)
            mask = raw[p + 4]
            p += 5
            if mask & 0xC0:
                return None
            value: Any = None
            status = 0
            source = 0
            if mask & 0x01:
                vt = raw[p]
                p += 1
                decoder = scalars.get(vt)
                if decoder is not None:
                    (value,) = decoder[0].unpack_from(raw, p)
                    p += decoder[1]
                elif vt == STRING:
                    (size,) = _INT32.unpack_from(raw, p)
                    p += 4
                    if size >= 0:
                        value = bytes(raw[p : p + size]).decode("utf-8", "surrogateescape")
                        p += size
                elif vt != 0:  # arrays, structures, other types: asyncua decodes them
                    return None
            if mask & 0x02:
                (status,) = _UINT32.unpack_from(raw, p)
                p += 4
            if mask & 0x04:
                (t,) = _INT64.unpack_from(raw, p)
                p += 8
                source = (t - _EPOCH_OFFSET) // 10_000 if t > _EPOCH_OFFSET else 0
            p += (2 if mask & 0x10 else 0) + (8 if mask & 0x08 else 0) + (2 if mask & 0x20 else 0)
            items.append((handle, value, status, source))
    return out


def _decode_slowly(raw: bytes) -> Notifications:
    """What asyncua's decoder makes of a PublishResponse, as ``Notifications``."""
    result = struct_from_binary(ua.PublishResponse, Buffer(raw)).Parameters
    message = result.NotificationMessage
    out = Notifications(
        result.SubscriptionId, message.SequenceNumber, bool(message.NotificationData)
    )
    for notif in message.NotificationData:
        if isinstance(notif, ua.DataChangeNotification):
            for item in notif.MonitoredItems:
                dv = item.Value
                source = dv.SourceTimestamp
                out.items.append(
                    (
                        item.ClientHandle,
                        dv.Value.Value if dv.Value is not None else None,
                        int(dv.StatusCode.value) if dv.StatusCode is not None else 0,
                        int(source.timestamp() * 1000) if source is not None else 0,
                    )
                )
        elif isinstance(notif, ua.StatusChangeNotification):
            out.status = int(notif.Status.value)
    return out


class Publisher:
    """Keeps Publish requests in flight on one session and hands each answer on.

    ``deliver`` gets every answer (``Notifications``); ``lost`` is called once with a
    reason when the session or channel is gone. Requests wait at the server until one
    of its subscriptions has something to say (or a keep-alive is due), so as many are
    kept in flight as there are subscriptions, up to ``limit``; a server that keeps fewer
    answers the surplus with BadTooManyPublishRequests, and that loop stops.
    """

    def __init__(
        self,
        client: Client,
        deliver: Callable[[Notifications], None],
        lost: Callable[[str], None],
        *,
        limit: int,
    ) -> None:
        self._client = client
        self._deliver = deliver
        self._lost = lost
        self.limit = limit
        self.acks: list[tuple[int, int]] = []
        self.answers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._failing: str | None = None

    @property
    def in_flight(self) -> int:
        """Publish loops running (each keeps one request at the server)."""
        return len(self._tasks)

    def ensure(self, wanted: int) -> None:
        """Keep ``wanted`` requests in flight (at most ``limit``)."""
        for _ in range(min(wanted, self.limit) - len(self._tasks)):
            task = asyncio.create_task(self._loop(), name="opcua publish")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cancel(self) -> list[asyncio.Task[None]]:
        """Stop every loop; the tasks, for a caller that waits for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        return tasks

    async def _loop(self) -> None:
        while True:
            acks, self.acks = self.acks, []
            try:
                kind, raw, pos = await exchange(self._client, _PUBLISH_TYPE, encode_acks(acks), 0)
            except ua.UaStatusCodeError as exc:
                if exc.code in _RETRY:
                    continue
                if exc.code in _ENOUGH:
                    # The server keeps fewer requests, or has no subscription left.
                    self.limit = max(1, len(self._tasks) - 1)
                    self.acks += acks
                    return
                name = ua.StatusCode(exc.code).name
                self._lost(f"publish refused: {name}")
                return
            except (ConnectionError, OSError, ua.UaError) as exc:
                self._lost(f"publish failed: {exc or type(exc).__name__}")
                return
            if kind != _PUBLISH_RESPONSE:
                self._lost(f"answer of type {kind} to a PublishRequest")
                return
            self.answers += 1
            try:
                notes = decode_publish(raw, pos)
            except (struct.error, IndexError):
                notes = None
            if notes is None:
                try:
                    notes = _decode_slowly(raw)
                except Exception as exc:  # a garbled answer: drop it, keep publishing
                    self._complain(f"publish answer not decoded: {exc!r}")
                    continue
            if notes.data:
                self.acks.append((notes.subscription_id, notes.sequence))
            try:
                self._deliver(notes)
            except Exception as exc:  # a bug in routing must not stop the publishing
                self._complain(f"publish answer not delivered: {exc!r}")

    def _complain(self, what: str) -> None:
        """Log a repeating problem once per change of its text."""
        if self._failing != what:
            self._failing = what
            _log.warning("opcua publish", extra={"error": what})
