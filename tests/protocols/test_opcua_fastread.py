"""The direct decoder of Read answers gives what asyncua's decoder gives, or steps aside."""

from __future__ import annotations

from datetime import UTC, datetime

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
