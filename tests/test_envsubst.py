"""``${NAME}`` in config files comes from the environment; an unset one is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iiot_common.envsubst import UnsetVariable, expand_env


def test_variables_are_expanded_inside_string_values() -> None:
    data = {"token": "${TOKEN}", "mqtt": {"url": "mqtt://${HOST}:1883"}, "port": 8080}
    out = expand_env(data, {"TOKEN": "s3cret", "HOST": "broker.local"})
    assert out == {"token": "s3cret", "mqtt": {"url": "mqtt://broker.local:1883"}, "port": 8080}


def test_a_secret_cannot_change_the_structure_of_the_file() -> None:
    # Commas, '#' and ': ' are part of the secret, not YAML.
    out = expand_env({"admin_tokens": ["${ADM}"]}, {"ADM": "s3cr3t,admin #x: y"})
    assert out == {"admin_tokens": ["s3cr3t,admin #x: y"]}


def test_unset_variables_are_each_named_with_where_they_are_used() -> None:
    with pytest.raises(UnsetVariable) as err:
        expand_env({"a": 1, "b": "${FIRST}", "c": ["${SECOND}"]}, {})
    assert "b: environment variable FIRST is not set" in str(err.value)
    assert "c[0]: environment variable SECOND is not set" in str(err.value)


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
