"""The evidence behind a stored ratio report: one row per device the snapshot counted,
kept as compact columns so the report can be counted again later from it alone.

A row holds what the stored numbers depend on: enterprise, device id, region (six
digits), industry (the division counted), category, family, whether the device is a
product, whether it is decommissioned, its last good sample as known when the snapshot
was taken (Unix ms, -1 for never), whether it was online then and whether it counted as
quality_connected then (connected and passing the data-quality gate). Evidence kept
before the last was recorded has no ``quality`` section: it decodes with ``quality``
None, "not recorded".

Encoding (``encode``; ``decode`` reads it back and refuses anything else):

- rows in (enterprise, device) order; every string column but the device id is
  dictionary-encoded over its sorted distinct values, with the smallest unsigned codes;
- device ids joined by newlines (an identifier has none);
- the three flags as packed bits, the quality flag as packed bits of its own (a section
  old evidence lacks); last good times as little-endian int64 with their
  bytes transposed (all first bytes, then all second bytes …), which compresses well;
- a JSON header (times, groupings, dictionaries, section sizes) before the sections.

The same devices always give the same bytes, so ``digest`` of them is a version of
what was counted; the bytes are stored compressed (``zlib``).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DICT_COLUMNS",
    "ENCODINGS",
    "Evidence",
    "EvidenceError",
    "compress",
    "decode",
    "decompress",
    "digest",
    "encode",
    "from_columns",
]

Codes = npt.NDArray[np.uint32]
Bools = npt.NDArray[np.bool_]
I64 = npt.NDArray[np.int64]

# The dictionary-encoded string columns, in the order they are stored.
DICT_COLUMNS = ("enterprise", "region", "industry", "category", "family")
_MAGIC = b"IIOT-EVIDENCE/1\n"
_HEADER = struct.Struct("<I")
# zlib first: at 10⁶ devices it compresses in a second or two, lzma (a little smaller) in
# tens of seconds.
ENCODINGS = ("zlib", "lzma")
# Decompressed evidence larger than this is refused rather than read (10⁷ devices fit).
_MAX_RAW = 1 << 30


class EvidenceError(ValueError):
    """Stored evidence that cannot be read; the message says what is wrong."""


@dataclass(frozen=True, slots=True, eq=False)
class Evidence:
    """The devices one snapshot counted, in (enterprise, device) order.

    ``values[c]`` is column ``c``'s sorted dictionary and ``codes[c]`` each row's
    position in it.
    """

    as_of_ms: int
    window_s: int
    groupings: tuple[str, ...]
    devices: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    codes: dict[str, Codes]
    product: Bools
    decommissioned: Bools
    online: Bools
    last_good: I64
    # Counted as quality_connected at ``as_of``; None: not recorded (older evidence).
    quality: Bools | None = None

    @property
    def n(self) -> int:
        return len(self.devices)

    def column(self, name: str) -> list[str]:
        """A dictionary-encoded column as strings, row by row."""
        values = self.values[name]
        return [values[c] for c in self.codes[name].tolist()]

    def connected(self) -> Bools:
        """Rows whose last good sample is newer than ``as_of - window`` (the definition)."""
        mask: Bools = self.last_good > max(self.as_of_ms - self.window_s * 1000, -1)
        return mask


def from_columns(
    *,
    as_of_ms: int,
    window_s: int,
    groupings: Sequence[str],
    devices: Sequence[str],
    columns: dict[str, tuple[Sequence[str], npt.NDArray[Any]]],
    product: Bools,
    decommissioned: Bools,
    online: Bools,
    last_good: I64,
    quality: Bools | None = None,
) -> Evidence:
    """Evidence in canonical form from unordered rows.

    ``columns[c]`` is column ``c`` as a dictionary (any order, duplicates allowed) and
    each row's code in it, as an index's encoders keep them.
    """
    values: dict[str, tuple[str, ...]] = {}
    codes: dict[str, Codes] = {}
    for name in DICT_COLUMNS:
        raw_values, raw_codes = columns[name]
        distinct = sorted(set(raw_values))
        rank = {v: i for i, v in enumerate(distinct)}
        remap = np.array([rank[v] for v in raw_values] or [0], np.uint32)
        values[name] = tuple(distinct)
        codes[name] = remap[np.asarray(raw_codes, np.int64)]
    ids = np.array(list(devices), dtype=str) if devices else np.array([], dtype="<U1")
    order = np.lexsort((ids, codes["enterprise"])) if len(ids) else np.array([], np.int64)
    return Evidence(
        as_of_ms=int(as_of_ms),
        window_s=int(window_s),
        groupings=tuple(groupings),
        devices=tuple(ids[order].tolist()),
        values=values,
        codes={name: c[order] for name, c in codes.items()},
        product=np.asarray(product, np.bool_)[order],
        decommissioned=np.asarray(decommissioned, np.bool_)[order],
        online=np.asarray(online, np.bool_)[order],
        last_good=np.asarray(last_good, np.int64)[order],
        quality=None if quality is None else np.asarray(quality, np.bool_)[order],
    )


def _code_dtype(size: int) -> str:
    return "u1" if size <= 1 << 8 else "u2" if size <= 1 << 16 else "u4"


def encode(ev: Evidence) -> bytes:
    """The canonical bytes of ``ev`` (uncompressed; see the module doc)."""
    n = ev.n
    sections: list[tuple[str, str, bytes]] = []
    for name in DICT_COLUMNS:
        dtype = _code_dtype(len(ev.values[name]))
        sections.append((name, dtype, ev.codes[name].astype("<" + dtype).tobytes()))
    sections.append(("device", "utf-8", "\n".join(ev.devices).encode("utf-8")))
    flags = np.concatenate([ev.product, ev.decommissioned, ev.online]).astype(np.bool_)
    sections.append(("flags", "bits", np.packbits(flags).tobytes()))
    if ev.quality is not None:
        sections.append(("quality", "bits", np.packbits(ev.quality.astype(np.bool_)).tobytes()))
    shuffled = ev.last_good.astype("<i8").view(np.uint8).reshape(n, 8).T
    sections.append(("last_good", "i8-transposed", shuffled.tobytes()))
    header = {
        "as_of": ev.as_of_ms,
        "window_s": ev.window_s,
        "groupings": list(ev.groupings),
        "n": n,
        "values": {name: list(ev.values[name]) for name in DICT_COLUMNS},
        "sections": [[name, kind, len(data)] for name, kind, data in sections],
    }
    head = json.dumps(header, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    raw = head.encode("utf-8")
    return b"".join([_MAGIC, _HEADER.pack(len(raw)), raw, *(data for _, _, data in sections)])


def digest(payload: bytes) -> str:
    """The version of what ``payload`` (canonical bytes) counted: a SHA-256 prefix."""
    return hashlib.sha256(payload).hexdigest()[:32]


def compress(payload: bytes, encoding: str = "zlib") -> bytes:
    """Compressed canonical bytes, for storage."""
    if encoding == "zlib":
        return zlib.compress(payload, 6)
    if encoding == "lzma":
        return lzma.compress(payload, preset=0)
    raise ValueError(f"evidence encoding {encoding!r} must be one of {', '.join(ENCODINGS)}")


def decompress(data: bytes, encoding: str) -> bytes:
    """The canonical bytes of stored evidence; EvidenceError if they cannot be read."""
    try:
        if encoding == "lzma":
            dec = lzma.LZMADecompressor()
            raw = dec.decompress(data, max_length=_MAX_RAW)
            if not dec.eof:
                raise EvidenceError("stored evidence is truncated or larger than allowed")
            return raw
        if encoding == "zlib":
            zdec = zlib.decompressobj()
            raw = zdec.decompress(data, _MAX_RAW)
            if not zdec.eof:
                raise EvidenceError("stored evidence is truncated or larger than allowed")
            return raw
    except (lzma.LZMAError, zlib.error) as exc:
        raise EvidenceError(f"stored evidence does not decompress ({encoding}): {exc}") from None
    raise EvidenceError(f"stored evidence has an unknown encoding {encoding!r}")


def decode(payload: bytes) -> Evidence:
    """Evidence from its canonical bytes; EvidenceError naming what is malformed."""
    if not payload.startswith(_MAGIC) or len(payload) < len(_MAGIC) + _HEADER.size:
        raise EvidenceError("stored evidence does not start with the evidence header")
    at = len(_MAGIC)
    (size,) = _HEADER.unpack_from(payload, at)
    at += _HEADER.size
    try:
        header = json.loads(payload[at : at + size].decode("utf-8"))
        at += size
        n = int(header["n"])
        parts: dict[str, bytes] = {}
        for name, _kind, length in header["sections"]:
            parts[str(name)] = payload[at : at + int(length)]
            at += int(length)
        if at != len(payload):
            raise EvidenceError("stored evidence has bytes past its last section")
        return _columns(header, parts, n)
    except EvidenceError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise EvidenceError(f"stored evidence is malformed: {exc}") from None


def _columns(header: dict[str, Any], parts: dict[str, bytes], n: int) -> Evidence:
    values = {name: tuple(str(v) for v in header["values"][name]) for name in DICT_COLUMNS}
    codes: dict[str, Codes] = {}
    for name in DICT_COLUMNS:
        col = np.frombuffer(parts[name], "<" + _code_dtype(len(values[name]))).astype(np.uint32)
        if len(col) != n or (n and int(col.max()) >= len(values[name])):
            raise EvidenceError(f"stored evidence: column {name} does not fit its dictionary")
        codes[name] = col
    devices = tuple(parts["device"].decode("utf-8").split("\n")) if n else ()
    if len(devices) != n:
        raise EvidenceError("stored evidence: the device ids do not match the row count")
    flags = np.unpackbits(np.frombuffer(parts["flags"], np.uint8))[: 3 * n].astype(np.bool_)
    good = np.frombuffer(parts["last_good"], np.uint8)
    if len(flags) != 3 * n or len(good) != 8 * n:
        raise EvidenceError("stored evidence: the flags or times do not match the row count")
    last_good = np.ascontiguousarray(good.reshape(8, n).T).view("<i8").reshape(n)
    quality: Bools | None = None
    if "quality" in parts:
        bits = np.unpackbits(np.frombuffer(parts["quality"], np.uint8))
        if len(bits) != (n + 7) // 8 * 8:
            raise EvidenceError("stored evidence: the quality flags do not match the row count")
        quality = bits[:n].astype(np.bool_)
    return Evidence(
        as_of_ms=int(header["as_of"]),
        window_s=int(header["window_s"]),
        groupings=tuple(str(g) for g in header["groupings"]),
        devices=devices,
        values=values,
        codes=codes,
        product=flags[:n],
        decommissioned=flags[n : 2 * n],
        online=flags[2 * n :],
        last_good=last_good.astype(np.int64),
        quality=quality,
    )
