"""An in-process MQTT broker (amqtt) that enforces Mosquitto's password and ACL files.

``iiot demo`` runs the whole system without an external server; this broker stands in
for Mosquitto and reads the very files the gateway's provisioning writes:

- the password file, ``user:$7$...`` lines (PBKDF2-SHA512, checked with
  ``gateway.provisioning.verify_mosquitto_hash``);
- the ACL file, Mosquitto's format for the subset the gateway writes and a little more:
  ``user NAME``, ``topic [read|write|readwrite|deny] PATTERN``, ``pattern [...] PATTERN``
  with ``%u``/``%c``, ``#`` comments. ``topic`` lines before the first ``user`` line
  apply to anonymous clients only, as in Mosquitto 2, and anonymous clients are refused
  whenever the files are given.

Access: ``read`` covers subscribe and receive, ``write`` covers publish (including the
will, checked at CONNECT). A subscription filter is allowed when every topic it can
match is matched by a granted pattern (``iiot/v1/E1/A/#`` is covered by
``iiot/v1/E1/A/#`` or ``iiot/v1/#``, never by ``iiot/v1/E1/A/data``). Every delivered
message is checked again against the receiver's read rules, so a ``deny`` rule holds
even inside a wider subscription.

Compared with Mosquitto 2.0 on the same files, this broker is stricter in two places and
lets through the same messages: Mosquitto grants any SUBSCRIBE and then drops each
message the subscriber may not read, where this broker refuses the subscription
(SUBACK 0x80); Mosquitto accepts a CONNECT whose will topic the user may not write and
drops the will later, where this broker refuses the CONNECT (code 5).

Both files are re-read by ``reload()`` and automatically at each CONNECT when their
modification time, size or inode changed (the provisioner replaces them atomically). A
file that fails to parse on reload leaves the previous rules in force and is counted
(``counters["reload_errors"]``); at start it raises ``AuthFileError`` naming file and
line.

amqtt 0.12 has no shared subscriptions (a ``$share/...`` filter is stored verbatim and
never matches). This module adds them: a ``$share/<group>/<filter>`` subscription is
checked against the ACL as written (the gateway's ACL grants ``$share/+/iiot/v1/#``),
and each message matching the filter goes to one connected member of the group, in
turn; retained messages are not sent on shared subscriptions (MQTT 5 behaviour).

It also closes gaps in amqtt 0.12's own handling: credentials are checked before a
CONNECT may touch the stored session of its client id (amqtt cleared or re-labelled it
first, so a refused client could silence a connected gateway or change an agent's
will); an authenticated client that claims a connected client id disconnects the old
connection, as Mosquitto does, but only when both are the same user: a client id whose
live or persistent session belongs to another user is refused (code 5, counted as
``connect_refused_client_id``). Mosquitto as shipped (deploy/mosquitto.conf,
``use_username_as_clientid true``) gets there another way, replacing every client id with
the username; either way one user cannot take another's client id or session, and the
iiot clients use their username as client id so both brokers see the same ids; and a
(re)connecting client receives retained messages only for its own subscriptions and only
on topics it may read (amqtt replayed those of every subscription on the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.utils import gen_client_id

from gateway.provisioning import verify_mosquitto_hash

__all__ = [
    "Acl",
    "AclRule",
    "AuthFileError",
    "EmbeddedBroker",
    "EmbeddedBrokerError",
    "filter_covered",
    "parse_acl",
    "parse_password_file",
    "topic_matches",
]

log = logging.getLogger("iiot.broker")

Access = Literal["read", "write", "readwrite", "deny"]
Operation = Literal["publish", "subscribe", "receive"]

_ACCESS: frozenset[str] = frozenset({"read", "write", "readwrite", "deny"})
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_DECISION_CACHE_SIZE = 65536
_MAX_QUEUED = 1000  # per offline persistent session
_NOISY_LOGGERS = ("amqtt", "transitions")


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start or stop; names the address."""


class AuthFileError(ValueError):
    """A password or ACL file could not be read or parsed; names the file and line."""


# --------------------------------------------------------------------------- topics


def _valid_filter(flt: str) -> bool:
    if not flt or "\x00" in flt:
        return False
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_covered(flt: str, pattern: str) -> bool:
    """True when every topic matched by filter ``flt`` is also matched by ``pattern``.

    A plain topic is a filter without wildcards, so this is also the match test for
    topics. Topics starting with ``$`` are not matched by a leading wildcard (MQTT 4.7.2).
    """
    if not _valid_filter(flt) or not _valid_filter(pattern):
        return False
    f = flt.split("/")
    p = pattern.split("/")
    if pattern[0] in "+#" and flt.startswith("$"):
        return False
    for i, pl in enumerate(p):
        if pl == "#":
            # '#' also matches the parent level: 'a/#' matches 'a'.
            return True
        if i >= len(f):
            return False
        fl = f[i]
        if fl == "#":
            return False
        if pl == "+":
            continue
        if fl == "+" or fl != pl:
            return False
    return len(f) == len(p)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: does ``pattern`` (may hold ``+``/``#``) match a plain ``topic``?"""
    if "+" in topic or "#" in topic:
        return False
    return filter_covered(topic, pattern)


def _split_shared(flt: str) -> tuple[str, str] | None:
    """``("group", "filter")`` for ``$share/group/filter``, else None."""
    if not flt.startswith("$share/"):
        return None
    parts = flt.split("/", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


# --------------------------------------------------------------------------- ACL


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``topic``/``pattern`` line: an access kind and a topic pattern."""

    access: Access
    pattern: str


@dataclass(frozen=True)
class Acl:
    """A parsed Mosquitto ACL file."""

    users: Mapping[str, tuple[AclRule, ...]] = field(default_factory=dict)
    anonymous: tuple[AclRule, ...] = ()
    patterns: tuple[AclRule, ...] = ()

    def rules_for(self, username: str | None, client_id: str | None) -> list[AclRule]:
        """The rules that apply to one client, ``%u``/``%c`` substituted."""
        if username is None:
            rules = list(self.anonymous)
        else:
            rules = list(self.users.get(username, ()))
        for rule in self.patterns:
            text = rule.pattern
            # Like Mosquitto, a name that could widen the pattern never substitutes.
            if "%u" in text:
                if username is None or any(c in username for c in "+#/"):
                    continue
                text = text.replace("%u", username)
            if "%c" in text:
                if not client_id or any(c in client_id for c in "+#/"):
                    continue
                text = text.replace("%c", client_id)
            rules.append(AclRule(rule.access, text))
        return rules

    def allows(
        self, username: str | None, client_id: str | None, topic: str, op: Operation
    ) -> bool:
        """Whether the client may ``op`` on ``topic`` (a subscription filter for subscribe)."""
        rules = self.rules_for(username, client_id)
        for rule in rules:
            if rule.access == "deny" and filter_covered(topic, rule.pattern):
                return False
        wanted = ("write", "readwrite") if op == "publish" else ("read", "readwrite")
        return any(r.access in wanted and filter_covered(topic, r.pattern) for r in rules)


def parse_acl(text: str, *, source: str = "<acl>") -> Acl:
    """Parse Mosquitto ACL text; ``AuthFileError`` names ``source`` and the line."""
    users: dict[str, list[AclRule]] = {}
    anonymous: list[AclRule] = []
    patterns: list[AclRule] = []
    current: list[AclRule] = anonymous
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, *tail = line.split(maxsplit=1)
        rest = tail[0] if tail else ""
        where = f"{source}:{lineno}"
        if keyword == "user":
            if not rest:
                raise AuthFileError(f"{where}: 'user' needs a name")
            current = users.setdefault(rest, [])
        elif keyword in ("topic", "pattern"):
            access = "readwrite"
            words = rest.split(maxsplit=1)
            if len(words) == 2 and words[0] in _ACCESS:
                access, rest = words
            if not rest:
                raise AuthFileError(f"{where}: '{keyword}' needs a topic")
            if not _valid_filter(rest):
                raise AuthFileError(f"{where}: invalid topic pattern {rest!r}")
            rule = AclRule(cast(Access, access), rest)
            (patterns if keyword == "pattern" else current).append(rule)
        else:
            raise AuthFileError(f"{where}: unknown ACL directive {keyword!r}")
    return Acl(
        users={u: tuple(r) for u, r in users.items()},
        anonymous=tuple(anonymous),
        patterns=tuple(patterns),
    )


def parse_password_file(text: str, *, source: str = "<passwords>") -> dict[str, str]:
    """Parse ``user:hash`` lines into ``{user: hash}``; ``AuthFileError`` names the line."""
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, entry = line.partition(":")
        if not sep or not user or not entry:
            raise AuthFileError(f"{source}:{lineno}: expected 'username:hash'")
        out[user] = entry
    return out


# --------------------------------------------------------------------------- auth state


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_ino, st.st_size)


class _AuthFiles:
    """The current password table and ACL, re-read when either file changes."""

    def __init__(self, password_file: Path, acl_file: Path, counters: Counter[str]) -> None:
        self.password_file = password_file
        self.acl_file = acl_file
        self.counters = counters
        self.passwords: dict[str, str] = {}
        self.acl = Acl()
        self._stamps: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
        # ACL decisions per (user, client id, topic, operation); every message asks twice.
        self._decisions: dict[tuple[str | None, str | None, str, str], bool] = {}
        self._lock = threading.Lock()  # reload() may be called from another thread

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthFileError(f"{path}: cannot read: {exc}") from exc

    def load(self) -> None:
        """Read both files now; raises ``AuthFileError`` and keeps the old rules on error."""
        with self._lock:
            try:
                stamps = (_stamp(self.password_file), _stamp(self.acl_file))
            except OSError as exc:
                raise AuthFileError(f"{exc.filename}: cannot read: {exc.strerror}") from exc
            passwords = parse_password_file(
                self._read(self.password_file), source=str(self.password_file)
            )
            acl = parse_acl(self._read(self.acl_file), source=str(self.acl_file))
            self.passwords, self.acl, self._stamps = passwords, acl, stamps
            self._decisions = {}
            self.counters["reloads"] += 1

    def refresh(self) -> None:
        """Reload when a file changed since the last load; errors are logged and counted."""
        try:
            stamps = (_stamp(self.password_file), _stamp(self.acl_file))
        except OSError as exc:
            self.counters["reload_errors"] += 1
            log.warning("broker auth file unreadable", extra={"file": exc.filename})
            return
        if stamps == self._stamps:
            return
        try:
            self.load()
        except AuthFileError as exc:
            self.counters["reload_errors"] += 1
            log.warning("broker auth files not reloaded", extra={"error": str(exc)})

    def allows(
        self, username: str | None, client_id: str | None, topic: str, op: Operation
    ) -> bool:
        key = (username, client_id, topic, op)
        decisions = self._decisions
        found = decisions.get(key)
        if found is None:
            if len(decisions) >= _DECISION_CACHE_SIZE:
                decisions.clear()
            found = decisions[key] = self.acl.allows(username, client_id, topic, op)
        return found

    def check_password(self, username: str, password: str) -> bool:
        entry = self.passwords.get(username)
        return entry is not None and verify_mosquitto_hash(password, entry)


class _FileAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """amqtt plugin: authenticate against the password file, filter topics by the ACL."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        # Set by EmbeddedBroker right after amqtt builds the plugin.
        self.files: _AuthFiles | None = None

    async def authenticate(self, *, session: Any) -> bool:
        files = self.files
        if files is None:
            return False
        files.refresh()
        username: str | None = session.username
        password: str | None = session.password
        if not username or password is None:
            files.counters["connect_refused_anonymous"] += 1
            return False
        if not files.check_password(username, password):
            files.counters["connect_refused_password"] += 1
            log.info("connect refused: bad credentials", extra={"user": username})
            return False
        if session.will_flag and session.will_topic:
            if not files.allows(username, session.client_id, session.will_topic, "publish"):
                files.counters["connect_refused_will"] += 1
                log.info(
                    "connect refused: will topic not writable",
                    extra={"user": username, "topic": session.will_topic},
                )
                return False
        files.counters["connects"] += 1
        return True

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        files = self.files
        if files is None or session is None or topic is None or action is None:
            return False
        op: Operation = Action(action).value
        ok = files.allows(session.username, session.client_id, topic, op)
        if not ok:
            files.counters[f"{op}_denied"] += 1
        return ok


# --------------------------------------------------------------------------- broker


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker with shared subscriptions and the CONNECT/retained fixes above."""

    _AUTH_KEY = "iiot.broker.authenticated"

    def __init__(
        self, config: dict[str, Any], counters: Counter[str], connect_timeout: float
    ) -> None:
        super().__init__(config)
        self.counters = counters
        self.connect_timeout = connect_timeout
        self._turns: dict[str, itertools.count[int]] = {}

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        """Read CONNECT and authenticate it before it may touch a stored session.

        amqtt clears (clean session) or updates (persistent session: username, will)
        the stored session of the same client id before authenticating, so a refused
        client could silence or re-label a connected one; here that happens only after
        the credentials are checked.
        """
        try:
            handler, session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                self.connect_timeout,
            )
        except Exception as exc:
            # Garbage, a half-sent packet or silence instead of CONNECT: hang up. amqtt's
            # decoder raises more than its own errors on garbage (ValueError, ...), and
            # anything escaping here would leak the listener's connection slot.
            self.counters["connect_malformed"] += 1
            log.info(
                "connection dropped: no valid CONNECT",
                extra={"peer": f"{remote_address}:{remote_port}", "error": str(exc)},
            )
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"no valid CONNECT: {exc!r}") from exc
        if not await super()._authenticate(session, None):
            session.attributes[self._AUTH_KEY] = False
            return handler, session
        if not await self._owns_client_id(session):
            session.attributes[self._AUTH_KEY] = False
            return handler, session
        if session.clean_session:
            if session.client_id:
                await self._take_over(session.client_id)
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            stored = self._sessions[session.client_id][0]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(stored, name, getattr(session, name))
            session = stored
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        session.attributes[self._AUTH_KEY] = True
        return handler, session

    async def _owns_client_id(self, session: Any) -> bool:
        """False when the client id's session belongs to another user.

        A client id is one user's: another user connecting with it would receive that
        session's queued messages and subscriptions, or disconnect its live connection.
        A disconnected clean session holds nothing and is dropped instead.
        """
        stored = self._sessions.get(session.client_id, (None, None))[0]
        if stored is None or stored.username == session.username:
            return True
        if stored.clean_session and not stored.transitions.is_connected():
            await self._delete_session(session.client_id)
            return True
        self.counters["connect_refused_client_id"] += 1
        log.info(
            "connect refused: client id belongs to another user",
            extra={"user": session.username, "client_id": session.client_id},
        )
        return False

    async def _take_over(self, client_id: str) -> None:
        """Close a connected session whose client id an authenticated client now claims."""
        old_session, old_handler = self._sessions.get(client_id, (None, None))
        if old_session is not None and old_session.transitions.is_connected():
            self.counters["session_takeovers"] += 1
            await old_handler.handle_connection_closed()
            await old_handler.stop()

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        # Already decided in _initialize_client_session, once per CONNECT.
        return bool(session.attributes.pop(self._AUTH_KEY, False))

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Any,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        if not client_session.attributes.get(self._AUTH_KEY, False):
            # Refuse before amqtt registers the session, so a refused client cannot
            # take over a connected session with the same client id.
            client_session.attributes.pop(self._AUTH_KEY, None)
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        await super()._handle_client_session(
            reader, writer, client_session, handler, server, listener_name
        )

    def _matches(self, topic: str, a_filter: str) -> bool:
        shared = _split_shared(a_filter)
        if shared is not None:
            return bool(super()._matches(topic, shared[1]))
        return bool(super()._matches(topic, a_filter))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter, qos = subscription
        if _split_shared(topic_filter) is not None:
            return
        subscribers = self._subscriptions.get(topic_filter, [])
        if all(s.client_id != session.client_id for s, _ in subscribers):
            # amqtt calls this on reconnect for every filter any client holds.
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            sub_qos = min(qos, retained.qos or qos)
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, sub_qos, retain=True)
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def _pick_shared(
        self, a_filter: str, topic: str, members: list[tuple[Any, int]]
    ) -> list[tuple[Any, int]]:
        """One connected member of a share group that may read ``topic``, round-robin."""
        ready = []
        for session, qos in members:
            if session.transitions.state != "connected":
                continue
            if await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                ready.append((session, qos))
        if not ready:
            self.counters["shared_undelivered"] += 1
            return []
        turn = self._turns.setdefault(a_filter, itertools.count())
        return [ready[next(turn) % len(ready)]]

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for k_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, k_filter):
                continue
            shared = _split_shared(k_filter)
            targets = (
                await self._pick_shared(k_filter, topic, subscriptions)
                if shared is not None
                else list(subscriptions)
            )
            for target_session, sub_qos in targets:
                qos = broadcast.get("qos", sub_qos)
                if shared is None and not await self._topic_filtering(
                    target_session, topic=topic, action=Action.RECEIVE
                ):
                    continue
                connected = target_session.transitions.state == "connected"
                if (
                    not connected
                    and not target_session.clean_session
                    and qos in (QOS_1, QOS_2)
                    and not target_session.is_anonymous
                ):
                    if target_session.retained_messages.qsize() >= _MAX_QUEUED:
                        # Mosquitto's max_queued_messages default: keep memory bounded.
                        self.counters["offline_queue_dropped"] += 1
                    else:
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if not connected:
                    continue
                handler = self._get_handler(target_session)
                if handler is not None:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )
        self.counters["messages_routed"] += 1


class EmbeddedBroker:
    """An in-process MQTT broker (amqtt) on loopback that enforces a Mosquitto-format password file and ACL file.

    Without the files every client is let in (for tests of other parts only).
    ``max_connections`` bounds concurrent clients (further ones wait for a slot);
    ``connect_timeout`` bounds the wait for a client's CONNECT packet. ``counters``
    counts connects, refusals by reason, denied publish/subscribe/receive, reloads and
    reload errors, and dropped garbage connections.
    """  # noqa: E501

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        max_connections: int = 1024,
        connect_timeout: float = 10.0,
    ) -> None:
        if (password_file is None) != (acl_file is None):
            raise EmbeddedBrokerError(
                "embedded broker: give both password_file and acl_file, or neither"
            )
        self.host = host
        self.port = port
        self.password_file = Path(password_file) if password_file else None
        self.acl_file = Path(acl_file) if acl_file else None
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.counters: Counter[str] = Counter()
        self._files = (
            _AuthFiles(self.password_file, self.acl_file, self.counters)
            if self.password_file is not None and self.acl_file is not None
            else None
        )
        self._broker: _Broker | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (the actual port once started with ``port=0``)."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def authenticated(self) -> bool:
        """True when clients must log in and the ACL applies."""
        return self._files is not None

    def _config(self) -> dict[str, Any]:
        plugins: dict[str, Any]
        if self._files is None:
            plugins = {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            }
        else:
            plugins = {f"{__name__}._FileAuthPlugin": {}}
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "max_connections": self.max_connections,
                }
            },
            "plugins": plugins,
        }

    async def start(self) -> None:
        """Listen on host:port; returns when clients can connect."""
        if self._broker is not None:
            raise EmbeddedBrokerError(f"embedded broker on {self.host}:{self.port} already running")
        for name in _NOISY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)
        if self._files is not None:
            self._files.load()
        broker = _Broker(self._config(), self.counters, self.connect_timeout)
        for plugin in broker.plugins_manager.plugins:
            if isinstance(plugin, _FileAuthPlugin):
                plugin.files = self._files
        # amqtt logs a traceback at ERROR when the bind fails; the error raised here says it.
        amqtt_log = logging.getLogger("amqtt.broker")
        saved = amqtt_log.level
        amqtt_log.setLevel(logging.CRITICAL)
        try:
            await asyncio.wait_for(broker.start(), _START_TIMEOUT)
        except Exception as exc:
            await broker.plugins_manager.close()
            cause = exc.__cause__ or exc
            raise EmbeddedBrokerError(
                f"embedded broker cannot listen on {self.host}:{self.port}: {cause}"
            ) from exc
        finally:
            amqtt_log.setLevel(saved)
        self._broker = broker
        if self.port == 0:
            # Port 0 asks the OS for a free port; report the one it chose.
            sockets = broker._servers["default"].instance.sockets
            self.port = int(sockets[0].getsockname()[1])
        log.info(
            "embedded broker listening",
            extra={"url": self.url, "authenticated": self.authenticated},
        )

    async def stop(self) -> None:
        """Disconnect every client and close the listener."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await asyncio.wait_for(broker.shutdown(), _STOP_TIMEOUT)
        except TimeoutError as exc:
            raise EmbeddedBrokerError(
                f"embedded broker on {self.host}:{self.port} did not stop in {_STOP_TIMEOUT}s"
            ) from exc
        # Connection handlers finish on the next loop iterations once sessions are gone.
        for _ in range(20):
            if not _connection_tasks():
                break
            await asyncio.sleep(0.01)
        log.info("embedded broker stopped", extra={"url": self.url})

    def reload(self) -> None:
        """Re-read the password and ACL files now; ``AuthFileError`` keeps the old rules."""
        if self._files is not None:
            self._files.load()

    # ----------------------------------------------------------------- threaded use

    def run_in_thread(self) -> None:
        """Start the broker on its own event loop in a daemon thread; returns when listening."""
        if self._thread is not None:
            raise EmbeddedBrokerError(f"embedded broker on {self.host}:{self.port} already running")
        loop = asyncio.new_event_loop()

        def _run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()

        thread = threading.Thread(target=_run, name=f"iiot-broker-{self.port}", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(_START_TIMEOUT + 5)
        except BaseException:
            _close_loop(loop, thread)
            raise
        self._thread, self._thread_loop = thread, loop

    def stop_thread(self) -> None:
        """Stop a broker started with ``run_in_thread`` and join its thread."""
        thread, loop = self._thread, self._thread_loop
        self._thread = self._thread_loop = None
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(_STOP_TIMEOUT + 5)
        finally:
            _close_loop(loop, thread)


def _connection_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running amqtt's per-connection coroutine."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").endswith("stream_connected")
    ]


def _close_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Cancel what is left on ``loop``, stop it, join ``thread`` and close the loop."""

    async def _cancel_rest() -> None:
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.wait(rest, timeout=_STOP_TIMEOUT)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(_cancel_rest(), loop).result(_STOP_TIMEOUT + 5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(_STOP_TIMEOUT)
    if not thread.is_alive():
        loop.close()
