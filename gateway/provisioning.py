"""Agent onboarding: provisioning keys → MQTT credentials, and Mosquitto's auth files.

An agent presents a provisioning key; the gateway registers it under the key's
enterprise, makes a random password, and rewrites Mosquitto's password file (PBKDF2-
SHA512 ``$7$`` entries, the format of ``mosquitto_passwd`` in Mosquitto 2.0) and ACL file
(an agent publishes only its uplink topics under ``iiot/v1/{enterprise}/{agent}/`` and
reads only its ``config``, ``scan`` and ``+/cmd``; the gateway's own user reads
``iiot/v1/#`` and is the only one that publishes those downlink topics). Both files are
replaced atomically with mode 0640 and group ``broker_auth.file_group`` (the broker runs
as its own user and must read them), then ``reload_command`` runs (typically a SIGHUP to
mosquitto) so the broker re-reads them. A failed reload (the broker not up yet, say) is
logged, counted and retried in the background; a broker that starts later reads the
files anyway.

A new or changed password is written to the files inside the database transaction that
records it: when a file cannot be written, nothing is committed, so the provisioning key
is not spent, no agent is half-registered and a rotated agent keeps its old password.

Client ids are usernames on the broker (``use_username_as_clientid``), so an agent's
username is its agent id and no agent id may be a gateway instance's username.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import hmac
import logging
import os
import secrets
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.registry import Conflict, Registry
from gateway.registry.agents import Credentials, Publish
from iiot_common.backoff import Backoff
from protocols.mqtt.contract import TOPIC_PREFIX
from protocols.mqtt.sparkplug.payload import NAMESPACE as SP_NAMESPACE

__all__ = [
    "Provisioner",
    "ProvisioningError",
    "mosquitto_hash",
    "verify_mosquitto_hash",
]

log = logging.getLogger("iiot.gateway.provisioning")

_ITERATIONS = 101  # mosquitto_passwd's default for $7$
_RELOAD_TIMEOUT = 10.0
_RELOAD_RETRY_MIN = 1.0
_RELOAD_RETRY_MAX = 60.0
_FILE_MODE = 0o640
# Topics below an agent's prefix: what it publishes, and what only the gateway publishes.
_UPLINK = ("agent", "batch", "+/state", "+/data", "reported", "discovered", "+/result")
_DOWNLINK = ("config", "scan", "+/cmd")
# Sparkplug B message types an edge node publishes, for itself and for its devices.
_SP_NODE = ("NBIRTH", "NDEATH", "NDATA")
_SP_DEVICE = ("DBIRTH", "DDEATH", "DDATA")


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


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ProvisioningError(f"broker_auth.file_group: no group named {name!r}") from None


def _write_all(
    files: list[tuple[Path, str]], mode: int = _FILE_MODE, gid: int | None = None
) -> None:
    """Replace each file atomically; all are written out before the first is replaced.

    Raises ``ProvisioningError`` naming the file (and its folder) that failed. Writing
    every temporary file first means a full disk or an unwritable folder changes none.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files:
            try:
                staged.append((_stage(path, text, mode, gid), path))
            except OSError as exc:
                raise _file_error(path, exc) from exc
        while staged:
            tmp, path = staged[0]
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _file_error(path, exc) from exc
            staged.pop(0)
    finally:
        for tmp, _path in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _stage(path: Path, text: str, mode: int, gid: int | None) -> str:
    """``text`` in a synced temporary file beside ``path``; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _file_error(path: Path, exc: OSError) -> ProvisioningError:
    return ProvisioningError(
        f"cannot write the broker's auth file {path} (folder {path.parent}): {exc.strerror or exc}"
    )


class Provisioner:
    """Redeems provisioning keys and keeps the broker's password and ACL files."""

    def __init__(self, registry: Registry, config: GatewayConfig) -> None:
        self.registry = registry
        self.config = config
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._retry: threading.Thread | None = None
        self._retry_wake = threading.Event()
        self._closed = threading.Event()
        self._reloaded = False  # set by a successful reload; the retry loop watches it

    @property
    def manages_broker(self) -> bool:
        b = self.config.broker_auth
        return b.password_file is not None and b.acl_file is not None

    @property
    def gateway_users(self) -> list[str]:
        """The broker usernames of this gateway instance and its peers."""
        own = [self.config.mqtt.username] if self.config.mqtt.username else []
        return own + [u for u in self.config.broker_auth.peer_gateway_users if u not in own]

    @property
    def reload_pending(self) -> bool:
        """True while a failed broker reload is being retried in the background."""
        return self._retry is not None and self._retry.is_alive()

    @property
    def broker_url(self) -> str:
        return self.config.broker_auth.broker_url_for_agents or self.config.mqtt.url

    def provision(self, key: str, agent_id: str) -> dict[str, Any]:
        """Register ``agent_id`` under the key's enterprise; returns its credentials once.

        Raises ``gateway.registry.NotFound`` for a bad/expired/used key, ``Conflict``
        when the agent id belongs to another enterprise, is a gateway instance's MQTT
        username, or is provisioned already and the key does not allow rotation;
        ``ProvisioningError`` when the broker files cannot be written (the key is then
        not spent and nothing is registered).
        """
        if agent_id in self.gateway_users:
            # render() keeps the gateway users' entries, so such an agent would get a
            # password that never works while its key use is spent; and with client ids
            # tied to usernames it would be the gateway's client.
            self.counters["refused_gateway_username"] += 1
            whose = (
                "the gateway's own MQTT username"
                if agent_id == self.config.mqtt.username
                else "another gateway instance's MQTT username (broker_auth.peer_gateway_users)"
            )
            raise Conflict(f"agent id {agent_id!r} is {whose}; choose another id")
        password = secrets.token_urlsafe(24)
        with self._change("provision", agent_id) as publish:
            agent, rotated = self.registry.redeem_provisioning_key(
                key, agent_id, mosquitto_hash(password), publish=publish
            )
        self.counters["provisioned"] += 1
        log.info("agent provisioned", extra={"agent": agent.id, "enterprise": agent.enterprise})
        return self._credentials(agent.id, agent.enterprise, password, rotated=rotated)

    def rotate(self, enterprise: str, agent_id: str, *, by: str) -> dict[str, Any]:
        """A new password for an existing agent (the old one stops working); audited.

        Raises ``gateway.registry.NotFound`` for an unknown agent, ``ProvisioningError``
        when the broker files cannot be written (the old password then stays).
        """
        if agent_id in self.gateway_users:
            raise Conflict(f"{agent_id!r} is a gateway instance's MQTT username, not an agent")
        password = secrets.token_urlsafe(24)
        with self._change("rotate", agent_id) as publish:
            self.registry.rotate_agent(
                enterprise, agent_id, mosquitto_hash(password), by=by, publish=publish
            )
        self.counters["rotated"] += 1
        return self._credentials(agent_id, enterprise, password, rotated=True)

    @contextlib.contextmanager
    def _change(self, action: str, agent_id: str) -> Iterator[Publish | None]:
        """Around a registry credentials change: the files are written before it commits.

        A file that cannot be written aborts the change (counted, logged, re-raised). A
        change that fails after the files were written (the commit, say) has them
        rewritten from the database, so they never keep what was not committed.
        """
        if not self.manages_broker:
            yield None
            return
        written: list[bool] = []

        def publish(credentials: Credentials) -> None:
            self._write_files(credentials)
            written.append(True)

        try:
            yield publish
        except ProvisioningError as exc:
            self.counters[f"{action}_file_errors"] += 1
            log.error(
                "broker auth files not written; nothing changed, the request may be retried",
                extra={"action": action, "agent": agent_id, "error": str(exc)},
            )
            raise
        except BaseException:
            if written:
                with contextlib.suppress(ProvisioningError):
                    self._write_files(None)
            raise
        # Another instance sharing the database may have committed an agent meanwhile
        # that this transaction could not see: write what is committed now. The files
        # already hold this change, so a failure here loses nothing of it.
        try:
            self._write_files(None)
        except ProvisioningError as exc:
            log.warning("broker auth files not refreshed after a change", extra={"error": str(exc)})
        self._reload_now()

    def _credentials(
        self, agent_id: str, enterprise: str, password: str, *, rotated: bool
    ) -> dict[str, Any]:
        return {
            "rotated": rotated,
            "agent_id": agent_id,
            "enterprise": enterprise,
            "username": agent_id,
            "password": password,
            "broker_url": self.broker_url,
            "topic_prefix": f"{TOPIC_PREFIX}/{enterprise}/{agent_id}",
        }

    def render(self, credentials: Credentials | None = None) -> tuple[str, str]:
        """The password file and ACL file contents for ``credentials`` (default: the database's)."""
        pw_lines: list[str] = []
        acl = ["# Written by the iiot gateway; changes here are overwritten.", ""]
        mqtt = self.config.mqtt
        gateway_users = self.gateway_users
        kept = self._kept_entries()
        for user in gateway_users:
            if user == mqtt.username:
                secret = mqtt.password.get_secret_value() if mqtt.password else ""
                if not secret:
                    # An empty password would let anyone in as the gateway, which reads
                    # everything and writes every agent's downlink.
                    raise ProvisioningError(
                        f"mqtt.password of gateway user {user!r} is empty: set it (it is "
                        "written to the broker's password file)"
                    )
                pw_lines.append(f"{user}:{mosquitto_hash(secret)}")
            elif user in kept:
                pw_lines.append(kept[user])
            acl += [
                f"user {user}",
                f"topic read {TOPIC_PREFIX}/#",
                f"topic read $share/+/{TOPIC_PREFIX}/#",
                *(f"topic write {TOPIC_PREFIX}/+/+/{t}" for t in _DOWNLINK),
                f"topic read {SP_NAMESPACE}/#",
                f"topic read $share/+/{SP_NAMESPACE}/#",
                # Rebirth requests and writes to Sparkplug edge nodes.
                f"topic write {SP_NAMESPACE}/+/NCMD/+",
                f"topic write {SP_NAMESPACE}/+/DCMD/+/+",
                "",
            ]
        if credentials is None:
            credentials = self.registry.agent_credentials()
        for agent_id, enterprise, pw_hash in credentials:
            if agent_id in gateway_users:
                continue
            pw_lines.append(f"{agent_id}:{pw_hash}")
            prefix = f"{TOPIC_PREFIX}/{enterprise}/{agent_id}"
            acl += [
                f"user {agent_id}",
                *(f"topic write {prefix}/{t}" for t in _UPLINK),
                *(f"topic read {prefix}/{t}" for t in _DOWNLINK),
                # Sparkplug B: group = enterprise, edge node = agent; the node's own
                # births, deaths and data, and the commands sent to it.
                *(f"topic write {SP_NAMESPACE}/{enterprise}/{t}/{agent_id}" for t in _SP_NODE),
                *(f"topic write {SP_NAMESPACE}/{enterprise}/{t}/{agent_id}/+" for t in _SP_DEVICE),
                f"topic read {SP_NAMESPACE}/{enterprise}/NCMD/{agent_id}",
                f"topic read {SP_NAMESPACE}/{enterprise}/DCMD/{agent_id}/+",
                f"topic read {SP_NAMESPACE}/STATE/+",  # primary hosts' online state
                "",
            ]
        return "\n".join(pw_lines) + "\n", "\n".join(acl)

    def _kept_entries(self) -> dict[str, str]:
        """Password-file lines of the peer gateway users, as the file has them now."""
        peers = set(self.config.broker_auth.peer_gateway_users)
        path = self.config.broker_auth.password_file
        if not peers or path is None:
            return {}
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ProvisioningError(f"cannot read {path}: {exc.strerror or exc}") from exc
        found = (line.strip() for line in text.splitlines())
        return {line.split(":", 1)[0]: line for line in found if line.split(":", 1)[0] in peers}

    def sync(self) -> bool:
        """Rewrite both files and reload the broker; False when the files are not managed.

        Raises ``ProvisioningError`` when a file cannot be written. A failed reload is
        logged, counted and retried in the background until it succeeds or ``close()``.
        """
        if not self.manages_broker:
            return False
        self._write_files(None)
        self._reload_now()
        return True

    def _write_files(self, credentials: Credentials | None) -> None:
        """Write both files for ``credentials`` (default: the database's); counted."""
        b = self.config.broker_auth
        assert b.password_file is not None and b.acl_file is not None
        with self._lock:
            passwords, acl = self.render(credentials)
            try:
                _write_all(
                    [(b.acl_file, acl), (b.password_file, passwords)],
                    gid=_group_id(b.file_group),
                )
            except ProvisioningError:
                self.counters["file_errors"] += 1
                raise
            self.counters["file_writes"] += 1

    def _reload_now(self) -> None:
        command = self.config.broker_auth.reload_command
        if command and self.manages_broker:
            error = self._reload(command)
            if error is not None:
                self._retry_later(command, error)

    def close(self) -> None:
        """Stop retrying a failed reload."""
        self._closed.set()
        self._retry_wake.set()
        if self._retry is not None:
            self._retry.join(_RELOAD_TIMEOUT + 1)
            self._retry = None

    def _reload(self, command: list[str]) -> str | None:
        """Run the reload command once; the error, or None when it worked."""
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, timeout=_RELOAD_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = f"broker reload command {command!r} failed: {exc}"
        else:
            if done.returncode == 0:
                self.counters["reloads"] += 1
                self._reloaded = True
                self._retry_wake.set()
                return None
            error = (
                f"broker reload command {command!r} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()[:200]}"
            )
        self.counters["reload_errors"] += 1
        return error

    def _retry_later(self, command: list[str], error: str) -> None:
        with self._lock:
            self._reloaded = False
            if self.reload_pending or self._closed.is_set():
                return
            log.warning(
                "broker reload failed; retrying in the background (a broker that starts "
                "later reads the files itself)",
                extra={"error": error},
            )
            self._retry_wake.clear()
            self._retry = threading.Thread(
                target=self._retry_loop,
                args=(command, error),
                name="iiot-broker-reload",
                daemon=True,
            )
            self._retry.start()

    def _retry_loop(self, command: list[str], error: str) -> None:
        backoff = Backoff(initial=_RELOAD_RETRY_MIN, maximum=_RELOAD_RETRY_MAX)
        backoff.next_delay()
        attempts = 1
        while not self._closed.is_set():
            self._retry_wake.wait(backoff.next_delay())
            self._retry_wake.clear()
            if self._closed.is_set() or self._reloaded:
                return
            attempts += 1
            self.counters["reload_retries"] += 1
            last, error = error, self._reload(command) or ""
            if not error:
                log.info("broker reloaded", extra={"attempts": attempts})
                return
            if error != last:  # one line per change, not per attempt
                log.warning("broker reload still failing", extra={"error": error})
