"""Requests serialised once, sent without asyncua's objects, and answers decoded directly.

A device reads the same nodes every poll, yet asyncua builds and serialises a ReadValueId
object per node and decodes every DataValue (with its timestamps, into datetimes) through
its generic struct machinery: that was most of the agent's CPU per datapoint. Here the
request body after its header is serialised once; only the header (handle, token) is
written per request. The answer's header and its DataValues of scalar built-in types are
decoded with ``struct`` directly; anything else (arrays, structures, diagnostics) falls
back to asyncua's decoder for that answer, so the result is the same either way.

Timestamps are not asked for (TimestampsToReturn Neither): a reading carries the agent's
own time, and the server is spared them too.

This uses asyncua 2.1's socket protocol (``_callbackmap``, ``_request_handle``,
``message_to_binary``), as ``UASocketProtocol._send_request`` does; pyproject pins
asyncua to 2.1.x. ``publish.py`` sends its Publish requests through ``exchange`` too.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import nodeid_from_binary, nodeid_to_binary, struct_from_binary
from asyncua.ua.ua_binary import struct_to_binary as _to_binary

from protocols.opcua.client import LiveClient

__all__ = [
    "LATE_USE_S",
    "OTHER",
    "PLAIN_FLOAT",
    "PLAIN_INT",
    "PreparedRead",
    "Result",
    "decode_plain",
    "decode_results",
    "exchange",
    "late_answer",
    "request_header",
    "type_id",
]

# How long an answer that came after its poll gave up stays the next poll's reading
# (stamped when it came): longer than a dead device's probe backoff grows to.
LATE_USE_S = 60.0

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_UINT32 = struct.Struct("<I")
_UINT16 = struct.Struct("<H")
_SERVICE_FAULT = ua.ObjectIds.ServiceFault_Encoding_DefaultBinary
_READ_RESPONSE = ua.ObjectIds.ReadResponse_Encoding_DefaultBinary

# Variant type id → (decoder, size) for the scalar types a profile's points use.
SCALARS: dict[int, tuple[struct.Struct, int]] = {
    t: (struct.Struct(f), struct.calcsize(f))
    for t, f in {
        1: "<?",  # Boolean
        2: "<b",  # SByte
        3: "<B",  # Byte
        4: "<h",  # Int16
        5: "<H",  # UInt16
        6: "<i",  # Int32
        7: "<I",  # UInt32
        8: "<q",  # Int64
        9: "<Q",  # UInt64
        10: "<f",  # Float
        11: "<d",  # Double
    }.items()
}
STRING = 12

# (raw value, status code) per node; status 0 is Good.
Result = tuple[Any, int]


def type_id(object_id: int) -> bytes:
    """The binary encoding id of a service's request, as it goes on the wire."""
    return bytes(nodeid_to_binary(ua.FourByteNodeId(object_id)))


_READ_TYPE = type_id(ua.ObjectIds.ReadRequest_Encoding_DefaultBinary)


def decode_results(raw: bytes | memoryview, count: int, pos: int = 0) -> list[Result] | None:
    """The DataValues of a ReadResponse (from ``pos``, after its header); None: fall back."""
    (n,) = _INT32.unpack_from(raw, pos)
    if n != count:
        return None
    pos += 4
    out: list[Result] = []
    scalars = SCALARS
    for _ in range(n):
        mask = raw[pos]
        pos += 1
        if mask & 0xC0:
            return None
        value: Any = None
        status = 0
        if mask & 0x01:
            vt = raw[pos]
            pos += 1
            decoder = scalars.get(vt)
            if decoder is not None:
                (value,) = decoder[0].unpack_from(raw, pos)
                pos += decoder[1]
            elif vt == STRING:
                (length,) = _INT32.unpack_from(raw, pos)
                pos += 4
                if length >= 0:
                    # As asyncua decodes strings: what is not UTF-8 stays surrogate-escaped.
                    value = bytes(raw[pos : pos + length]).decode("utf-8", "surrogateescape")
                    pos += length
            elif vt != 0:  # arrays, structures, other types: asyncua decodes them
                return None
        if mask & 0x02:
            (status,) = _UINT32.unpack_from(raw, pos)
            pos += 4
        pos += (8 if mask & 0x04 else 0) + (2 if mask & 0x10 else 0)
        pos += (8 if mask & 0x08 else 0) + (2 if mask & 0x20 else 0)
        out.append((value, status))
    return out


# What a point's Good value may be to go out as it is (``decode_plain``).
OTHER, PLAIN_FLOAT, PLAIN_INT = 0, 1, 2
_INT_TYPES = frozenset(range(2, 10))  # SByte .. UInt64
_NUMBER_TYPES = frozenset(range(2, 12))  # .. Float, Double


def decode_plain(raw: bytes, count: int, pos: int, kinds: Sequence[int]) -> list[Any] | None:
    """The values of a ReadResponse whose every result is a Good plain number, else None.

    ``kinds`` gives per node what its point takes as it is: ``PLAIN_FLOAT`` a finite
    number, ``PLAIN_INT`` an integer (``OTHER``: nothing, so None). The common answer of a
    poll, decoded in one pass; anything else goes through ``decode_results``.
    """
    (n,) = _INT32.unpack_from(raw, pos)
    if n != count:
        return None
    pos += 4
    out: list[Any] = []
    scalars = SCALARS
    for kind in kinds:
        mask = raw[pos]
        vt = raw[pos + 1]
        if kind == PLAIN_FLOAT:
            if vt not in _NUMBER_TYPES:
                return None
        elif kind != PLAIN_INT or vt not in _INT_TYPES:
            return None
        decoder, size = scalars[vt]
        (value,) = decoder.unpack_from(raw, pos + 2)
        pos += 2 + size
        if mask != 1:
            # Value and a Good status only; timestamps were not asked for.
            if mask != 3 or _UINT32.unpack_from(raw, pos)[0]:
                return None
            pos += 4
        if vt >= 10 and value - value != 0.0:  # NaN or infinity: a sensor fault
            return None
        out.append(value)
    return out


# RequestHandle, ReturnDiagnostics, AuditEntryId (null string), TimeoutHint
_HEADER_TAIL = struct.Struct("<IIiI")
_NULL_EXTENSION = b"\x00\x00\x00"  # AdditionalHeader: no extension object
_EPOCH_OFFSET = 116_444_736_000_000_000  # 1601-01-01 to 1970-01-01, in 100 ns
_TOKENS: dict[ua.NodeId, bytes] = {}


def request_header(token: ua.NodeId, handle: int, timeout_ms: int) -> bytes:
    """A RequestHeader as asyncua serialises it, without building the object."""
    token_bytes = _TOKENS.get(token)
    if token_bytes is None:
        if len(_TOKENS) > 64:  # one per session opened: bounded
            _TOKENS.clear()
        token_bytes = _TOKENS[token] = nodeid_to_binary(token)
    now = time.time_ns() // 100 + _EPOCH_OFFSET
    return (
        token_bytes
        + _INT64.pack(now)
        + _HEADER_TAIL.pack(handle & 0xFFFFFFFF, 0, -1, timeout_ms)
        + _NULL_EXTENSION
    )


def _response_start(raw: bytes) -> tuple[int, int, int]:
    """The answer's type id, service result and where its body starts (after the header)."""
    if raw[0] == 0x01:  # four-byte NodeId, as every standard service's encoding id is
        (kind,) = _UINT16.unpack_from(raw, 2)
        pos = 4
    else:
        buf = Buffer(raw)
        nid = nodeid_from_binary(buf)
        kind = nid.Identifier if isinstance(nid.Identifier, int) else -1
        pos = buf.cur_pos
    (result,) = _UINT32.unpack_from(raw, pos + 12)
    # Timestamp, RequestHandle, ServiceResult; then no diagnostics, an empty string
    # table and no additional header, as servers answer unless asked for diagnostics.
    p = pos + 16
    if raw[p] == 0 and _INT32.unpack_from(raw, p + 1)[0] <= 0 and raw[p + 5 : p + 8] == b"\0\0\0":
        return kind, result, p + 8
    buf = Buffer(raw, pos)
    struct_from_binary(ua.ResponseHeader, buf)
    return kind, result, buf.cur_pos


async def exchange(
    client: Client,
    request_type: bytes,
    params: bytes,
    hint_ms: int,
    keep: Callable[[asyncio.Future[Any]], None] | None = None,
) -> tuple[int, bytes, int]:
    """Send one request: its type id, a header written here, and its serialised parameters.

    ``hint_ms`` is the header's timeout hint (0: none). An answer tells a ``LiveClient``
    its server is alive. When the caller gives up (cancelled), ``keep`` gets the future
    that will hold the answer still to come, or holds it when it came just as the caller
    gave up (for ``late_answer``). Returns the answer's
    type id, its bytes and where the body after the response header starts; a
    ServiceFault or a Bad service result raises ``ua.UaStatusCodeError``. The caller
    bounds the wait.
    """
    uaclient = client.uaclient
    async with uaclient._request_semaphore:
        proto = uaclient.protocol
        if proto is None or proto.transport is None:
            raise ConnectionError("Connection is not open")
        proto._request_handle += 1
        header = request_header(proto.authentication_token, proto._request_handle, hint_ms)
        request_id = proto._request_id + 1
        try:
            proto.revolve_security_token()
            msg = proto._connection.message_to_binary(
                request_type + header + params,
                message_type=ua.MessageType.SecureMessage,
                request_id=request_id,
            )
        except Exception:
            proto._request_handle -= 1
            raise
        proto._request_id = request_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto._callbackmap[request_id] = future
        proto.transport.write(msg)
        try:
            data = await future
        except asyncio.CancelledError:
            stand_in = _answer_later(client, proto._callbackmap, request_id, future)
            if (
                stand_in is None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            ):
                stand_in = future  # answered as the caller gave up: the answer is here
            if stand_in is not None and keep is not None:
                keep(stand_in)
            raise
    return _opened(client, data)


async def late_answer(client: Client, stand_in: asyncio.Future[Any]) -> tuple[int, bytes, int]:
    """The answer to a request given up on earlier (``exchange``'s ``keep``), as it returns.

    Giving up on this wait too leaves ``stand_in`` waiting for the answer.
    """
    return _opened(client, await asyncio.shield(stand_in))


def _opened(client: Client, data: Any) -> tuple[int, bytes, int]:
    """An answer's type id, bytes and body start; a ServiceFault or Bad result raised."""
    if isinstance(client, LiveClient):
        client.saw_answer()
    raw = bytes(data)
    kind, result, pos = _response_start(raw)
    if kind == _SERVICE_FAULT or result & 0x80000000:
        # A Bad service result on any answer: raise it as asyncua would.
        ua.StatusCode(result or ua.StatusCodes.BadUnexpectedError).check()
    return kind, raw, pos


def _answer_later(
    client: Client, waiting: dict[int, Any], request_id: int, given_up: asyncio.Future[Any]
) -> asyncio.Future[Any] | None:
    """Put a stand-in where a request the caller gave up on waits for its answer.

    The server still answers it: the stand-in takes the answer as a sign of life (a busy
    shared session answers late, not never), keeps asyncua from warning of a finished
    request once per late answer, and holds it for a caller that still wants it. None
    when the request is no longer waiting (answered as it was given up, or the session
    went away).
    """
    if waiting.get(request_id) is not given_up:
        return None
    stand_in: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def _arrived(f: asyncio.Future[Any]) -> None:
        if f.cancelled() or f.exception() is not None:  # retrieved: the session went away
            return
        if isinstance(client, LiveClient):
            client.saw_answer()

    stand_in.add_done_callback(_arrived)
    waiting[request_id] = stand_in
    return stand_in


class PreparedRead:
    """A Read of fixed nodes' values: serialised once, sent per poll."""

    def __init__(self, node_ids: Sequence[ua.NodeId]) -> None:
        params = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Neither,
            NodesToRead=[
                ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value) for n in node_ids
            ],
        )
        self._params = bytes(_to_binary(params))
        self.count = len(node_ids)
        # The answer to a request its poll gave up on (a busy server), and when it came
        # (ms since 1970; 0: still to come).
        self.late: asyncio.Future[Any] | None = None
        self.late_ms = 0
        # When the answer the last ``send_raw`` returned came, when it was such a late
        # one taken from before the call; 0 otherwise.
        self.answered_ms = 0

    async def send(self, client: Client, hint: float) -> list[Result]:
        """Send the request (``hint``: the header's timeout hint, s); (value, status) per node.

        The caller bounds the wait.
        """
        raw, pos = await self.send_raw(client, hint)
        return self.results(raw, pos)

    async def send_raw(self, client: Client, hint: float) -> tuple[bytes, int]:
        """Send the request; the answer and where its results start (for ``decode_plain``).

        While the request of an earlier call that gave up is still unanswered, this waits
        for that answer instead of sending another: a server that answers in order would
        otherwise have one more request of this device queued each poll, behind the last.
        An answer that came after its call gave up, within ``hint`` (at least
        ``LATE_USE_S``) before this one, is
        this call's answer (``answered_ms`` says when it came): on a busy server a poll
        with a short bound (a probe) would otherwise never see one.
        """
        late, self.late = self.late, None
        self.answered_ms = 0
        if late is not None and not late.done():
            try:
                kind, raw, pos = await late_answer(client, late)
            except asyncio.CancelledError:
                self.late = late  # given up again: still the one to wait for
                raise
        elif late is not None and self._fresh(late, hint):
            self.answered_ms = self.late_ms
            kind, raw, pos = _opened(client, late.result())
        else:
            kind, raw, pos = await exchange(
                client, _READ_TYPE, self._params, int(hint * 1000), self._keep
            )
        if kind != _READ_RESPONSE:
            raise ua.UaError(f"answer of type {kind} to a ReadRequest")
        return raw, pos

    def _keep(self, stand_in: asyncio.Future[Any]) -> None:
        self.late = stand_in
        self.late_ms = 0
        stand_in.add_done_callback(self._came)

    def _came(self, stand_in: asyncio.Future[Any]) -> None:
        if stand_in is self.late:
            self.late_ms = time.time_ns() // 1_000_000

    def _fresh(self, late: asyncio.Future[Any], hint: float) -> bool:
        """The late answer came well (no error), less than ``hint`` s or ``LATE_USE_S``
        ago: a probe on a backoff comes seconds after it, and still sees it."""
        if late.cancelled() or late.exception() is not None or not self.late_ms:
            return False
        return time.time_ns() // 1_000_000 - self.late_ms <= max(hint, LATE_USE_S) * 1000

    def results(self, raw: bytes, pos: int) -> list[Result]:
        """(value, status) per node of an answer from ``send_raw``."""
        results = decode_results(raw, self.count, pos)
        if results is not None:
            return results
        full = struct_from_binary(ua.ReadResponse, Buffer(raw))
        return [
            (dv.Value.Value if dv.Value is not None else None, _code(dv)) for dv in full.Results
        ]


def _code(dv: ua.DataValue) -> int:
    return int(dv.StatusCode.value) if dv.StatusCode is not None else 0
