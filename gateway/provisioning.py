"""Agent onboarding: provisioning keys → MQTT credentials, and Mosquitto's auth files.

An agent presents a provisioning key; the gateway registers it under the key's
enterprise, makes a random password, and rewrites Mosquitto's password file (PBKDF2-
SHA512 ``$7$`` entries, the format of ``mosquitto_passwd`` in Mosquitto 2.0) and ACL file
(an agent publishes only its uplink topics under ``iiot/v1/{enterprise}/{agent}/`` and
reads only its ``config``, ``scan`` and ``+/cmd``; the gateway's own user reads
``iiot/v1/#`` and is the only one that publishes those downlink topics). Both files are
replaced atomically, then ``reload_command`` runs (typically a SIGHUP to mosquitto) so
the broker re-reads them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.registry import Conflict, Registry
from protocols.mqtt.contract import TOPIC_PREFIX

__all__ = [
    "Provisioner",
    "ProvisioningError",
    "mosquitto_hash",
    "verify_mosquitto_hash",
]

log = logging.getLogger("iiot.gateway.provisioning")

_ITERATIONS = 101  # mosquitto_passwd's default for $7$
_RELOAD_TIMEOUT = 10.0
# Topics below an agent's prefix: what it publishes, and what only the gateway publishes.
_UPLINK = ("agent", "+/state", "+/data", "reported", "discovered", "+/result")
_DOWNLINK = ("config", "scan", "+/cmd")


class ProvisioningError(RuntimeError):
    """The broker's auth files could not be written or reloaded; names the file/command."""


def mosquitto_hash(
    password: str, *, iterations: int = _ITERATIONS, salt: bytes | None = None
) -> str:
    """A Mosquitto 2.0 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 hash>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, entry: str) -> bool:
    parts = entry.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(got, expected)


def _write_atomic(path: Path, text: str, mode: int = 0o640) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Provisioner:
    """Redeems provisioning keys and keeps the broker's password and ACL files."""

    def __init__(self, registry: Registry, config: GatewayConfig) -> None:
        self.registry = registry
        self.config = config
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    @property
    def manages_broker(self) -> bool:
        b = self.config.broker_auth
        return b.password_file is not None and b.acl_file is not None

    @property
    def broker_url(self) -> str:
        return self.config.broker_auth.broker_url_for_agents or self.config.mqtt.url

    def provision(self, key: str, agent_id: str) -> dict[str, Any]:
        """Register ``agent_id`` under the key's enterprise; returns its credentials once.

        Raises ``gateway.registry.NotFound`` for a bad/expired/used key, ``Conflict``
        when the agent id belongs to another enterprise or is the gateway's own MQTT
        username, ``ProvisioningError`` when the broker files cannot be updated.
        """
        if self.config.mqtt.username and agent_id == self.config.mqtt.username:
            # render() keeps the gateway's own entry, so such an agent would get a
            # password that never works while its key use is spent.
            self.counters["refused_gateway_username"] += 1
            raise Conflict(
                f"agent id {agent_id!r} is the gateway's own MQTT username; choose another id"
            )
        password = secrets.token_urlsafe(24)
        agent = self.registry.redeem_provisioning_key(key, agent_id, mosquitto_hash(password))
        self.sync()
        self.counters["provisioned"] += 1
        log.info("agent provisioned", extra={"agent": agent.id, "enterprise": agent.enterprise})
        return {
            "agent_id": agent.id,
            "enterprise": agent.enterprise,
            "username": agent.id,
            "password": password,
            "broker_url": self.broker_url,
            "topic_prefix": f"{TOPIC_PREFIX}/{agent.enterprise}/{agent.id}",
        }

    def render(self) -> tuple[str, str]:
        """The password file and ACL file contents for every agent in the database."""
        pw_lines: list[str] = []
        acl = ["# Written by the iiot gateway; changes here are overwritten.", ""]
        mqtt = self.config.mqtt
        if mqtt.username:
            secret = mqtt.password.get_secret_value() if mqtt.password else ""
            pw_lines.append(f"{mqtt.username}:{mosquitto_hash(secret)}")
            acl += [
                f"user {mqtt.username}",
                f"topic read {TOPIC_PREFIX}/#",
                f"topic read $share/+/{TOPIC_PREFIX}/#",
                *(f"topic write {TOPIC_PREFIX}/+/+/{t}" for t in _DOWNLINK),
                "",
            ]
        for agent_id, enterprise, pw_hash in self.registry.agent_credentials():
            if agent_id == mqtt.username:
                continue
            pw_lines.append(f"{agent_id}:{pw_hash}")
            prefix = f"{TOPIC_PREFIX}/{enterprise}/{agent_id}"
            acl += [
                f"user {agent_id}",
                *(f"topic write {prefix}/{t}" for t in _UPLINK),
                *(f"topic read {prefix}/{t}" for t in _DOWNLINK),
                "",
            ]
        return "\n".join(pw_lines) + "\n", "\n".join(acl)

    def sync(self) -> bool:
        """Rewrite both files and reload the broker; False when the files are not managed."""
        b = self.config.broker_auth
        if b.password_file is None or b.acl_file is None:
            return False
        with self._lock:
            passwords, acl = self.render()
            try:
                _write_atomic(b.acl_file, acl)
                _write_atomic(b.password_file, passwords)
            except OSError as exc:
                self.counters["file_errors"] += 1
                raise ProvisioningError(
                    f"cannot write broker auth files {b.password_file} / {b.acl_file}: "
                    f"{exc.strerror or exc}"
                ) from exc
            self.counters["file_writes"] += 1
            if b.reload_command:
                self._reload(b.reload_command)
        return True

    def _reload(self, command: list[str]) -> None:
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, timeout=_RELOAD_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.counters["reload_errors"] += 1
            raise ProvisioningError(f"broker reload command {command!r} failed: {exc}") from exc
        if done.returncode != 0:
            self.counters["reload_errors"] += 1
            raise ProvisioningError(
                f"broker reload command {command!r} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()[:200]}"
            )
        self.counters["reloads"] += 1
