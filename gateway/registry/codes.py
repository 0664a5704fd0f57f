"""Codes the registry understands: GB/T 2260 regions, GB/T 4754 industries, categories.

Each check returns the normalised value or raises ``ValueError`` with a message that
says what was wrong; labels are bilingual ("石家庄市 Shijiazhuang").
"""

from __future__ import annotations

import csv
import io
import re
from importlib import resources

from device_profiles.families import builtin_families
from device_profiles.schema import Category
from iiot_common.identifier import IDENTIFIER_RE, check_identifier

__all__ = [
    "CATEGORY_LABELS",
    "FAMILY_CATEGORY",
    "FAMILY_LABELS",
    "IDENT_RE",
    "INDUSTRY_LABELS",
    "REGION_LABELS",
    "UNKNOWN",
    "category_label",
    "check_category",
    "check_family",
    "check_ident",
    "check_industry",
    "check_region",
    "check_text",
    "family_label",
    "industry_division",
    "industry_label",
    "region_label",
    "region_prefix_range",
]

UNKNOWN = "unknown"
IDENT_RE = IDENTIFIER_RE

# GB/T 2260 province-level prefixes (first two digits).
_PROVINCES = frozenset(
    {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46}
    | {50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82}
)

# GB/T 2260 names of every province, city and county (regions.csv beside this module, from
# the Ministry of Civil Affairs' code list; English names are the pinyin with the level).
# The few entries below are missing from that list (Hebei's directly administered cities
# and new area) and are named as Hebei's programme names them.
_REGION_OVERRIDES: dict[str, str] = {
    "133100": "雄安新区 Xiong'an New Area",
    "130181": "辛集市 Xinji",
    "130682": "定州市 Dingzhou",
}


def _load_regions() -> dict[str, str]:
    text = resources.files(__package__).joinpath("regions.csv").read_text(encoding="utf-8")
    labels = {
        row["code"]: f"{row['name_zh']} {row['name_en']}"
        for row in csv.DictReader(io.StringIO(text))
    }
    labels.update(_REGION_OVERRIDES)
    return labels


REGION_LABELS: dict[str, str] = _load_regions()

# GB/T 4754-2017 sections and the divisions (two digits) each one spans.
_SECTIONS: dict[str, tuple[int, int]] = {
    "A": (1, 5),
    "B": (6, 12),
    "C": (13, 43),
    "D": (44, 46),
    "E": (47, 50),
    "F": (51, 52),
    "G": (53, 60),
    "H": (61, 62),
    "I": (63, 65),
    "J": (66, 69),
    "K": (70, 70),
    "L": (71, 72),
    "M": (73, 75),
    "N": (76, 79),
    "O": (80, 82),
    "P": (83, 83),
    "Q": (84, 85),
    "R": (86, 90),
    "S": (91, 96),
    "T": (97, 97),
}
_INDUSTRY_RE = re.compile(r"^([A-T])(\d{2})(\d{0,2})$")

INDUSTRY_LABELS: dict[str, str] = {
    "B06": "煤炭开采和洗选业 Coal mining",
    "C17": "纺织业 Textiles",
    "C25": "石油、煤炭及其他燃料加工业 Petroleum and coal processing",
    "C26": "化学原料和化学制品制造业 Chemicals",
    "C30": "非金属矿物制品业 Non-metallic mineral products",
    "C31": "黑色金属冶炼和压延加工业 Steel smelting and rolling",
    "C32": "有色金属冶炼和压延加工业 Non-ferrous metals",
    "C33": "金属制品业 Metal products",
    "C34": "通用设备制造业 General equipment",
    "C35": "专用设备制造业 Special equipment",
    "C36": "汽车制造业 Automobiles",
    "C38": "电气机械和器材制造业 Electrical machinery",
    "C39": "计算机、通信和其他电子设备制造业 Electronics",
    "D44": "电力、热力生产和供应业 Power and heat supply",
}

CATEGORY_LABELS: dict[str, str] = {
    Category.HIGH_ENERGY_PROCESS.value: "高耗能流程行业设备 High-energy process equipment",
    Category.GENERAL_POWER.value: "通用动力设备 General power equipment",
    Category.NEW_ENERGY.value: "新能源设备 New-energy equipment",
    Category.INTELLIGENT.value: "智能化设备和产品 Intelligent equipment",
    UNKNOWN: "未分类 Unclassified",
}

# Families are data (device_profiles/families.yaml): bilingual labels and, for the
# families that have one, the policy category a ledger row or a birth falls back to.
FAMILY_LABELS: dict[str, str] = {k: f.label for k, f in builtin_families().items()}
FAMILY_CATEGORY: dict[str, str] = {
    k: f.category.value for k, f in builtin_families().items() if f.category is not None
}


def check_ident(value: object, what: str) -> str:
    return check_identifier(value, what)


def check_region(value: object) -> str:
    """A GB/T 2260 six-digit code with a real province prefix."""
    text = str(value).strip() if isinstance(value, str | int) else ""
    if not (len(text) == 6 and text.isascii() and text.isdigit()):
        raise ValueError(f"region {value!r} must be a six-digit GB/T 2260 code such as 130102")
    if int(text[:2]) not in _PROVINCES:
        raise ValueError(f"region {value!r}: {text[:2]!r} is not a GB/T 2260 province code")
    return text


def check_industry(value: object) -> str:
    """A GB/T 4754 code: section letter + division (2 digits), optionally group/class."""
    text = value.strip().upper() if isinstance(value, str) else ""
    m = _INDUSTRY_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"industry {value!r} must be a GB/T 4754 code such as C30")
    lo, hi = _SECTIONS[m.group(1)]
    if not lo <= int(m.group(2)) <= hi:
        raise ValueError(
            f"industry {value!r}: division {m.group(2)} is not in section {m.group(1)}"
            f" ({lo:02d}-{hi:02d})"
        )
    return text


def industry_division(code: str) -> str:
    """The division (letter + two digits) an industry code rolls up to."""
    return code[:3]


def check_text(value: str, what: str) -> str:
    """Free text the database can store: encodable as UTF-8 (no lone surrogates), no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (it has a lone surrogate)") from None
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    return value


def check_category(value: object) -> str:
    if not isinstance(value, str) or value not in CATEGORY_LABELS or value == UNKNOWN:
        allowed = ", ".join(c.value for c in Category)
        raise ValueError(f"unknown category {value!r} (one of {allowed})")
    return str(value)


def check_family(value: object) -> str:
    if not isinstance(value, str) or value not in FAMILY_LABELS:
        raise ValueError(f"unknown family {value!r} (one of {', '.join(FAMILY_LABELS)})")
    return str(value)


def region_prefix_range(value: str) -> tuple[int, int]:
    """[lo, hi) of six-digit codes under a region filter: '13', '1301', '130100', '130102'."""
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) in (2, 4, 6)):
        raise ValueError(f"region {value!r} must be 2, 4 or 6 digits (13, 1301, 130102)")
    if len(text) == 6:
        text = text[:2] if text[2:] == "0000" else text[:4] if text[4:] == "00" else text
    scale = 10 ** (6 - len(text))
    return int(text) * scale, (int(text) + 1) * scale


def region_label(code: str) -> str:
    """Bilingual name of a region code; 2- and 4-digit prefixes name the province or city."""
    full = code.ljust(6, "0") if len(code) in (2, 4) else code
    return REGION_LABELS.get(full, code)


def industry_label(code: str) -> str:
    return INDUSTRY_LABELS.get(code, code)


def category_label(key: str) -> str:
    return CATEGORY_LABELS.get(key, key)


def family_label(key: str) -> str:
    return FAMILY_LABELS.get(key, key)
