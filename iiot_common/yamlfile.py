"""Read a YAML file with errors a person can act on: unreadable, not UTF-8, not YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# libyaml's loader where PyYAML was built with it: a 5,000-device agent config loads in a
# fraction of the pure-Python loader's time. Both are safe loaders. libyaml words errors
# less helpfully (a tab is "found character that cannot start any token") and refuses a
# few documents the pure-Python loader reads, so a file it refuses is read again by that
# loader, which then decides: the result and the message are the pure-Python loader's.
_FAST: Any = getattr(yaml, "CSafeLoader", None)

__all__ = ["YamlFileError", "read_yaml"]


class YamlFileError(ValueError):
    """What is wrong with the file (the caller adds the path)."""


def read_yaml(path: Path) -> Any:
    """The parsed document; raises YamlFileError naming the problem and, for YAML, the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlFileError(f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"not UTF-8 (byte {exc.start}); save the file as UTF-8") from exc
    if _FAST is not None:
        try:
            return yaml.load(text, Loader=_FAST)
        except yaml.YAMLError:
            pass  # read again below, for the pure-Python loader's verdict and wording
    try:
        return yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise YamlFileError(f"{where}not valid YAML ({getattr(exc, 'problem', exc)})") from exc
