"""``${NAME}`` in config files comes from the environment; an unset one is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iiot.envsubst import UnsetVariable, expand_env


def test_variables_are_expanded_and_comments_left_alone() -> None:
    text = "token: ${TOKEN}\n# example: ${NOT_SET}\nurl: mqtt://${HOST}:1883"
    out = expand_env(text, {"TOKEN": "s3cret", "HOST": "broker.local"})
    assert out == "token: s3cret\n# example: ${NOT_SET}\nurl: mqtt://broker.local:1883"


def test_unset_variables_are_each_named_with_their_line() -> None:
    with pytest.raises(UnsetVariable) as err:
        expand_env("a: 1\nb: ${FIRST}\nc: ${SECOND}", {})
    assert "line 2: environment variable FIRST is not set" in str(err.value)
    assert "line 3: environment variable SECOND is not set" in str(err.value)


def test_gateway_refuses_a_config_with_an_unset_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("api:\n  admin_tokens: ['${IIOT_TEST_UNSET_TOKEN_VAR}']\n")
    proc = subprocess.run(
        [sys.executable, "-m", "iiot", "gateway", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "IIOT_TEST_UNSET_TOKEN_VAR is not set" in proc.stderr
