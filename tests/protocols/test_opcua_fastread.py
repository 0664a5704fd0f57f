"""The direct decoders of Read and Publish answers give what asyncua gives, or step aside."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from asyncua import ua
from asyncua.ua.ua_binary import struct_to_binary

from protocols.opcua.fastread import decode_results


def _body(values: list[ua.DataValue]) -> bytes:
    """The Results array of a ReadResponse as a server writes it."""
    response = ua.ReadResponse()
    response.Results = values
    full = struct_to_binary(response)
    # An empty answer is TypeId + ResponseHeader + two empty arrays (4 bytes each): what
    # follows the header in the full one is Results, then DiagnosticInfos.
    head = len(struct_to_binary(ua.ReadResponse())) - 8
    return bytes(full[head:])


def test_scalars_strings_and_statuses_decode_as_asyncua_decodes_them() -> None:
    values = [
        ua.DataValue(ua.Variant(101.25, ua.VariantType.Double)),
        ua.DataValue(ua.Variant(1.5, ua.VariantType.Float)),
        ua.DataValue(ua.Variant(-7, ua.VariantType.Int16)),
        ua.DataValue(ua.Variant(4_000_000_000, ua.VariantType.UInt32)),
        ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)),
        ua.DataValue(ua.Variant("Mill-1 程序", ua.VariantType.String)),
        ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadDeviceFailure)),
        ua.DataValue(
            ua.Variant(3, ua.VariantType.UInt16),
            StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
            SourceTimestamp=datetime.now(UTC),
        ),
    ]
    got = decode_results(_body(values), len(values))
    assert got == [
        (101.25, 0),
        (1.5, 0),
        (-7, 0),
        (4_000_000_000, 0),
        (True, 0),
        ("Mill-1 程序", 0),
        (None, ua.StatusCodes.BadDeviceFailure),
        (3, ua.StatusCodes.UncertainLastUsableValue),
    ]


def test_arrays_and_structures_are_left_to_asyncua() -> None:
    array = [ua.DataValue(ua.Variant([1.0, 2.0], ua.VariantType.Double))]
    assert decode_results(_body(array), 1) is None
    node = [ua.DataValue(ua.Variant(ua.NodeId(5, 2), ua.VariantType.NodeId))]
    assert decode_results(_body(node), 1) is None


def test_a_count_that_does_not_match_the_request_is_refused() -> None:
    values = [ua.DataValue(ua.Variant(1.0, ua.VariantType.Double))]
    assert decode_results(_body(values), 2) is None


def test_request_header_is_what_asyncua_would_send() -> None:
    import struct

    from asyncua.ua.ua_binary import nodeid_to_binary

    from protocols.opcua.fastread import request_header

    for token in (ua.NodeId(12345, 0), ua.NodeId(b"\x01\x02" * 8, 1, ua.NodeIdType.ByteString)):
        header = ua.RequestHeader(AuthenticationToken=token, RequestHandle=77, TimeoutHint=4000)
        theirs, mine = struct_to_binary(header), request_header(token, 77, 4000)
        n = len(nodeid_to_binary(token))
        assert mine[:n] == theirs[:n]
        assert mine[n + 8 :] == theirs[n + 8 :]  # all but the timestamp, which is now
        (t_theirs,), (t_mine,) = (
            struct.unpack_from("<q", theirs, n),
            struct.unpack_from("<q", mine, n),
        )
        assert abs(t_mine - t_theirs) < 50_000_000  # within 5 s, in 100 ns units


def test_plain_numbers_decode_in_one_pass_and_anything_else_steps_aside() -> None:
    from protocols.opcua.fastread import OTHER, PLAIN_FLOAT, PLAIN_INT, decode_plain

    plain = [
        ua.DataValue(ua.Variant(101.25, ua.VariantType.Double)),
        ua.DataValue(ua.Variant(7, ua.VariantType.Int32)),  # a number for a float64 point
        ua.DataValue(ua.Variant(-3, ua.VariantType.Int16)),
    ]
    kinds = [PLAIN_FLOAT, PLAIN_FLOAT, PLAIN_INT]
    assert decode_plain(_body(plain), 3, 0, kinds) == [101.25, 7, -3]
    # Each of these needs the full path: a status, a sensor fault, a type, a conversion.
    uncertain = ua.DataValue(
        ua.Variant(1.0, ua.VariantType.Double),
        StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
    )
    for other, kind in (
        (uncertain, PLAIN_FLOAT),
        (ua.DataValue(ua.Variant(float("nan"), ua.VariantType.Double)), PLAIN_FLOAT),
        (ua.DataValue(ua.Variant("1.0", ua.VariantType.String)), PLAIN_FLOAT),
        (ua.DataValue(ua.Variant(2.5, ua.VariantType.Double)), PLAIN_INT),
        (ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)), PLAIN_INT),
        (ua.DataValue(ua.Variant(2.5, ua.VariantType.Double)), OTHER),
    ):
        assert decode_plain(_body([*plain, other]), 4, 0, [*kinds, kind]) is None, other


def _publish(notifications: list[Any]) -> bytes:
    response = ua.PublishResponse()
    response.Parameters = ua.PublishResult(
        SubscriptionId=42,
        AvailableSequenceNumbers=[6, 7],
        MoreNotifications=False,
        NotificationMessage=ua.NotificationMessage(
            SequenceNumber=7, PublishTime=datetime.now(UTC), NotificationData=notifications
        ),
    )
    return bytes(struct_to_binary(response))


def test_publish_answers_decode_as_asyncua_decodes_them() -> None:
    from protocols.opcua.fastread import _response_start
    from protocols.opcua.publish import _decode_slowly, decode_publish

    at = datetime(2024, 5, 1, 8, 30, 0, 250_000, tzinfo=UTC)
    items = [
        ua.MonitoredItemNotification(
            ClientHandle=h, Value=ua.DataValue(v, StatusCode=s, SourceTimestamp=at)
        )
        for h, v, s in (
            (1, ua.Variant(21.5, ua.VariantType.Double), None),
            (2, ua.Variant(-9, ua.VariantType.Int64), None),
            (2, ua.Variant(-8, ua.VariantType.Int64), None),  # a second queued value
            (3, ua.Variant("Mill-1 程序", ua.VariantType.String), None),
            (4, None, ua.StatusCode(ua.StatusCodes.BadDeviceFailure)),
        )
    ]
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    raw = _publish([ua.DataChangeNotification(MonitoredItems=items), status])
    _, _, pos = _response_start(raw)
    fast = decode_publish(raw, pos)
    assert fast is not None and fast == _decode_slowly(raw)
    ms = int(at.timestamp() * 1000)
    assert (fast.subscription_id, fast.sequence, fast.data) == (42, 7, True)
    assert fast.items == [
        (1, 21.5, 0, ms),
        (2, -9, 0, ms),
        (2, -8, 0, ms),
        (3, "Mill-1 程序", 0, ms),
        (4, None, ua.StatusCodes.BadDeviceFailure, ms),
    ]
    assert fast.status == ua.StatusCodes.BadTimeout
    # A keep-alive carries nothing to acknowledge.
    keepalive = _publish([])
    _, _, pos = _response_start(keepalive)
    assert decode_publish(keepalive, pos) == _decode_slowly(keepalive)
    assert not _decode_slowly(keepalive).data
    # Arrays are left to asyncua.
    array = ua.MonitoredItemNotification(
        ClientHandle=5, Value=ua.DataValue(ua.Variant([1.0, 2.0], ua.VariantType.Double))
    )
    raw = _publish([ua.DataChangeNotification(MonitoredItems=[array])])
    _, _, pos = _response_start(raw)
    assert decode_publish(raw, pos) is None
    assert _decode_slowly(raw).items == [(5, [1.0, 2.0], 0, 0)]
