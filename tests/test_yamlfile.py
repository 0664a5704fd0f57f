"""Reading YAML files: libyaml's speed, with the pure-Python loader's results and messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iiot_common.yamlfile import YamlFileError, read_yaml


def _pure(text: str) -> object:
    return yaml.load(text, Loader=yaml.SafeLoader)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The commonest mistake in a hand-edited file: the message names the tab.
        ("devices:\n\t- id: kiln-1\n", "line 2: not valid YAML (found character '\\t' that"),
        ("a: *missing\n", "line 1: not valid YAML (found undefined alias 'missing')"),
        (
            "a:\n  b: 1\n c: 2\n",
            "line 3: not valid YAML (expected <block end>, but found '<block mapping start>')",
        ),
        ("a: b\x07\n", "special characters are not allowed"),
    ],
)
def test_errors_read_as_the_pure_python_loader_words_them(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(YamlFileError) as info:
        read_yaml(path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        'name: "\\ud83d\\ude00 \\ud800"\n',  # escapes libyaml refuses and PyYAML reads
        "a: 1\n\ufeffb: 2\n",
        "a: 1\nb: [x, {c: 2.5}]\nd: 2024-01-01\ne: 0x1F\n",
    ],
)
def test_documents_read_as_the_pure_python_loader_reads_them(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert read_yaml(path) == _pure(text)
