"""A Read request serialised once per device, and a direct decoder of its answer.

A device reads the same nodes every poll, yet asyncua builds and serialises a ReadValueId
object per node and decodes every DataValue (with its timestamps, into datetimes) through
its generic struct machinery: that was most of the agent's CPU per datapoint. Here the
request body after its header is serialised once; only the header (handle, token) is
written per poll. The answer's DataValues of scalar built-in types are decoded with
``struct`` directly; anything else (arrays, structures, diagnostics) falls back to
asyncua's decoder for that answer, so the result is the same either way.

Timestamps are not asked for (TimestampsToReturn Neither): a reading carries the agent's
own time, and the server is spared them too.

This uses asyncua 2.1's socket protocol (``_setup_request_header``, ``_callbackmap``,
``message_to_binary``), as ``UASocketProtocol._send_request`` does; pyproject pins
asyncua to 2.1.x.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import Any

from asyncua import Client, ua
from asyncua.ua.ua_binary import nodeid_from_binary, nodeid_to_binary, struct_from_binary
from asyncua.ua.ua_binary import struct_to_binary as _to_binary

__all__ = ["PreparedRead", "Result", "decode_results", "request_header"]

_READ_TYPE = nodeid_to_binary(ua.FourByteNodeId(ua.ObjectIds.ReadRequest_Encoding_DefaultBinary))
_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_UINT32 = struct.Struct("<I")

# Variant type id → (decoder, size) for the scalar types a profile's points use.
_SCALARS: dict[int, tuple[struct.Struct, int]] = {
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
_STRING = 12

# (raw value, status code) per node; status 0 is Good.
Result = tuple[Any, int]


def decode_results(raw: bytes | memoryview, count: int) -> list[Result] | None:
    """The DataValues of a ReadResponse body (after its header), or None to fall back."""
    (n,) = _INT32.unpack_from(raw, 0)
    if n != count:
        return None
    pos = 4
    out: list[Result] = []
    scalars = _SCALARS
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
            elif vt == _STRING:
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
        self._params = _to_binary(params)
        self.count = len(node_ids)

    async def send(self, client: Client, hint: float) -> list[Result]:
        """Send the request (``hint``: the header's timeout hint, s); (value, status) per node.

        The caller bounds the wait.
        """
        uaclient = client.uaclient
        async with uaclient._request_semaphore:
            proto = uaclient.protocol
            if proto is None or proto.transport is None:
                raise ConnectionError("Connection is not open")
            proto._request_handle += 1
            header = request_header(
                proto.authentication_token, proto._request_handle, int(hint * 1000)
            )
            body = _READ_TYPE + header + self._params
            request_id = proto._request_id + 1
            try:
                proto.revolve_security_token()
                msg = proto._connection.message_to_binary(
                    body, message_type=ua.MessageType.SecureMessage, request_id=request_id
                )
            except Exception:
                proto._request_handle -= 1
                raise
            proto._request_id = request_id
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            proto._callbackmap[request_id] = future
            proto.transport.write(msg)
            data = await future
        proto.check_answer(data, " in response to ReadRequest")
        whole = data.copy()
        nodeid_from_binary(data)
        header_out = struct_from_binary(ua.ResponseHeader, data)
        header_out.ServiceResult.check()
        results = decode_results(bytes(data), self.count)
        if results is not None:
            return results
        full = struct_from_binary(ua.ReadResponse, whole)
        return [
            (dv.Value.Value if dv.Value is not None else None, _code(dv)) for dv in full.Results
        ]


def _value(dv: ua.DataValue) -> Any:
    return dv.Value.Value if dv.Value is not None else None


def _code(dv: ua.DataValue) -> int:
    return int(dv.StatusCode.value) if dv.StatusCode is not None else 0
