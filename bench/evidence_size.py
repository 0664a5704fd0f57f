"""Size and cost of a snapshot's evidence (``gateway.evidence``) at 1,000,000 devices.

Synthetic rows shaped like ``bench/ratios.py`` (20,000 enterprises x 50 devices over
Hebei's counties, 70 % reporting): for each kind of device id and each compression,
prints bytes per device, and the time to encode, compress, decompress and decode; and,
for one, the time verification takes to count the evidence again and to compare it
with a registry.

    .venv/bin/python bench/evidence_size.py [--devices 1000000]

Device ids: ``short`` as the ratio bench names them (d00..d49 per enterprise);
``ledger``, ids as a ledger might carry them (family, year, serial: ``boiler-2019-04817``);
``random``, 12 random characters (the worst case for compression).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from gateway.evidence import (
    ENCODINGS,
    Evidence,
    compress,
    decode,
    decompress,
    digest,
    encode,
    from_columns,
)
from gateway.provincial import recount, registry_changes
from gateway.ratios import GROUPINGS
from gateway.registry.codes import FAMILY_CATEGORY

AS_OF = 1_750_000_000_000
WINDOW_S = 86400
CITIES = ["1301", "1302", "1303", "1304", "1305", "1306", "1307", "1308", "1309", "1310", "1311"]
INDUSTRIES = ["C26", "C30", "C31", "C33", "C34", "C38", "D44"]
PER_ENTERPRISE = 50
_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def _ids(style: str, families: list[str], rng: random.Random) -> list[str]:
    n = len(families)
    if style == "short":
        return [f"d{k % PER_ENTERPRISE:02d}" for k in range(n)]
    if style == "ledger":
        # Unique within an enterprise, as the registry's keys are.
        return [
            f"{f}-{rng.randint(2005, 2025)}-{k % PER_ENTERPRISE:02d}{rng.randrange(1000):03d}"
            for k, f in enumerate(families)
        ]
    return ["".join(rng.choices(_ALPHABET, k=12)) for _ in range(n)]


def _evidence(n: int, style: str, rng: random.Random) -> Evidence:
    ents = [f"ent-{e:06d}" for e in range(n // PER_ENTERPRISE)]
    regions = [f"{rng.choice(CITIES)}{rng.randint(1, 30):02d}" for _ in ents]
    industries = [rng.choice(INDUSTRIES) for _ in ents]
    fams = sorted(FAMILY_CATEGORY)
    families = [rng.choice(fams) for _ in range(n)]
    fam_codes = np.array([fams.index(f) for f in families])
    ent_of = np.arange(n) // PER_ENTERPRISE
    reporting = np.array([rng.random() < 0.7 for _ in range(n)])
    # Reporting devices sent a good sample within the last minute (a few ahead of as_of,
    # agent clocks run ahead); the others never did, or last did days ago.
    recent = AS_OF - np.array([rng.randrange(-2_000, 60_000) for _ in range(n)], np.int64)
    old = AS_OF - np.array([rng.randrange(86_400_000, 40 * 86_400_000) for _ in range(n)])
    never = np.array([rng.random() < 0.5 for _ in range(n)])
    last_good = np.where(reporting, recent, np.where(never, -1, old)).astype(np.int64)
    return from_columns(
        as_of_ms=AS_OF,
        window_s=WINDOW_S,
        groupings=GROUPINGS,
        devices=_ids(style, families, rng),
        columns={
            "enterprise": (ents, ent_of),
            "region": (regions, ent_of),
            "industry": (industries, ent_of),
            # A family's position in ``fams`` is its code in both dictionaries.
            "category": ([FAMILY_CATEGORY[f] for f in fams], fam_codes),
            "family": (fams, fam_codes),
        },
        product=np.array([rng.random() < 0.05 for _ in range(n)]),
        decommissioned=np.array([rng.random() < 0.01 for _ in range(n)]),
        online=reporting & np.array([rng.random() < 0.9 for _ in range(n)]),
        last_good=last_good,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.devices
    for style in ("short", "ledger", "random"):
        ev = _evidence(n, style, random.Random(7))
        started = time.perf_counter()
        payload = encode(ev)
        version = digest(payload)
        built = time.perf_counter() - started
        print(
            f"ids {style}: {n:,} devices, canonical {len(payload) / n:.2f} B/device, "
            f"encode+hash {built:.2f} s, version {version}"
        )
        for encoding in ENCODINGS:
            t0 = time.perf_counter()
            blob = compress(payload, encoding)
            t1 = time.perf_counter()
            back = decode(decompress(blob, encoding))
            t2 = time.perf_counter()
            assert back.n == n and digest(encode(back)) == version
            print(
                f"  {encoding}: {len(blob) / n:.2f} B/device ({len(blob) / 1e6:.1f} MB), "
                f"compress {t1 - t0:.2f} s, decompress+decode {t2 - t1:.2f} s"
            )
        if style == "ledger":
            t0 = time.perf_counter()
            again = recount(ev)
            t1 = time.perf_counter()
            changes = registry_changes(ev, ev)
            t2 = time.perf_counter()
            assert not any(changes["counts"].values())
            print(
                f"  verify: recount {len(again)} rows {t1 - t0:.2f} s, "
                f"compare with the registry {t2 - t1:.2f} s"
            )


if __name__ == "__main__":
    main()
