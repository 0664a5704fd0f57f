"""Shared Modbus lines: one client and one lock per serial port or TCP peer.

Modbus TCP lines use ``protocols.modbus.tcp.TcpClient`` (pymodbus's requests and framing
without its transaction manager: a poll's cost is mostly per request); serial lines and
RTU framed over TCP use pymodbus's own async clients.

RS-485 is half-duplex and a Modbus TCP gateway serves several unit ids over one socket,
so every device on the same ``ModbusConnection.line_key`` shares one client, and their
requests are serialised by one ``asyncio.Lock`` with the configured pause between them.
The pool counts references: the last ``release`` closes the client.

pymodbus clients reconnect on their own by default; here that is switched off
(``reconnect_delay=0``; ``TcpClient`` never reconnects by itself) and each request gets
one connect attempt when the line is down, bounded by the device's timeout. When to try
again is the agent's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any

import serial
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException
from pymodbus.framer import FramerType

from iiot_common.deadline import deadline_after
from protocols.errors import ConfigError, ConnectError
from protocols.modbus.config import ModbusConnection
from protocols.modbus.tcp import TcpClient

__all__ = ["Line", "acquire_line", "open_lines", "release_line"]

# Longer than any device timeout (ModbusConnection.timeout ≤ 60): the driver bounds
# each request itself, so pymodbus's own timer never fires first.
_CLIENT_TIMEOUT = 120.0

# Settings every device on one line must agree on.
_LINE_FIELDS = (
    "transport",
    "host",
    "port",
    "serial_port",
    "baudrate",
    "parity",
    "stopbits",
    "bytesize",
)


def _make_client(
    conn: ModbusConnection, name: str, on_connect: Callable[[bool], None]
) -> AsyncModbusTcpClient | AsyncModbusSerialClient | TcpClient:
    if conn.transport == "rtu":
        assert conn.serial_port is not None
        return AsyncModbusSerialClient(
            conn.serial_port,
            framer=FramerType.RTU,
            baudrate=conn.baudrate,
            bytesize=conn.bytesize,
            parity=conn.parity,
            stopbits=conn.stopbits,
            name=name,
            reconnect_delay=0,
            timeout=_CLIENT_TIMEOUT,
            retries=0,
            trace_connect=on_connect,
        )
    assert conn.host is not None
    if conn.transport == "tcp":
        return TcpClient(conn.host, conn.port, on_connect=on_connect)
    return AsyncModbusTcpClient(
        conn.host,
        port=conn.port,
        framer=FramerType.RTU if conn.transport == "rtu-over-tcp" else FramerType.SOCKET,
        name=name,
        reconnect_delay=0,
        timeout=_CLIENT_TIMEOUT,
        retries=0,
        trace_connect=on_connect,
    )


class Line:
    """One physical or TCP line: its client, its lock, and who uses it."""

    def __init__(self, key: str, conn: ModbusConnection, device: str) -> None:
        self.key = key
        self.conn = conn
        self.first_device = device
        self.client = _make_client(conn, key, self._on_connect)
        self.lock = asyncio.Lock()
        self.users: list[str] = []
        self.pool_key: tuple[int, str] = (0, key)  # (event loop, line key) in the pool
        self.connects = 0
        self.disconnects = 0
        self._last_end = 0.0
        self._lost = False
        self._waiter: asyncio.Task[Any] | None = None  # the task running a request
        self._cancelled_by_loss = False

    def _on_connect(self, up: bool) -> None:
        # pymodbus leaves a request waiting for its full timeout when the peer closes
        # the connection; cancelling the task waiting on it lets ``run`` give up at once.
        if up:
            self._lost = False
            return
        self.disconnects += 1
        self._lost = True
        waiter = self._waiter
        # Only from outside the waiting task (pymodbus reports the loss from transport
        # callbacks); inside it the request fails on its own.
        if waiter is not None and not self._cancelled_by_loss and waiter is not _current():
            self._cancelled_by_loss = True
            waiter.cancel()

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    async def ensure_connected(self, limit: float, device: str) -> None:
        """Open the line if it is down: one attempt, at most ``limit`` seconds.

        Any failure to open or configure it (a missing port, a port locked by someone
        else, settings the port refuses: ``termios.error`` is no ``OSError``) is a
        ``ConnectError`` whose ``detail`` names the cause, and the port is released.
        """
        if self.client.connected:
            return
        where = (
            self.conn.serial_port
            if self.conn.transport == "rtu"
            else f"{self.conn.host}:{self.conn.port}"
        )
        self.connects += 1
        cause = ""
        try:
            async with deadline_after(limit):
                ok = await self.client.connect()
        except TimeoutError:
            ok, cause = False, f"no connection within {limit}s"
        except asyncio.CancelledError:
            self.client.close()
            raise
        except Exception as exc:  # serial ports raise here (termios, settings, permissions)
            self.client.close()
            _close_orphaned_ports(exc)
            cause = _cause(exc, self.conn)
            raise ConnectError(
                f"device '{device}': cannot open {where}: {cause}", detail=cause
            ) from exc
        if not ok or not self.client.connected:
            self.client.close()
            if not cause and self.conn.transport == "rtu":
                cause = _serial_cause(self.conn)
            text = f"device '{device}': cannot connect to {where}"
            raise ConnectError(f"{text}: {cause}" if cause else text, detail=cause)

    async def wait_pause(self, pause: float) -> None:
        """Sleep until ``pause`` seconds have passed since the previous request ended."""
        if pause > 0:
            wait = self._last_end + pause - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, pause))

    async def run(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one request on the client; the caller holds ``lock`` and bounds the time.

        The request runs in the caller's task (no task per request); when the line is
        lost meanwhile, that task is cancelled and the cancellation turned into
        ``ConnectionException`` (a cancellation from anyone else passes through).
        """
        if self._lost:
            raise ConnectionException(f"{self.key}: connection closed during the request")
        task = asyncio.current_task()
        self._waiter = task
        try:
            return await call(self.client)
        except asyncio.CancelledError:
            if self._cancelled_by_loss and task is not None:
                self._cancelled_by_loss = False
                if task.uncancel() == 0:
                    raise ConnectionException(
                        f"{self.key}: connection closed during the request"
                    ) from None
            raise
        finally:
            self._waiter = None
            self._cancelled_by_loss = False
            self._last_end = time.monotonic()

    def close(self) -> None:
        self.client.close()


def _cause(exc: BaseException, conn: ModbusConnection | None = None) -> str:
    """A short, single-line text for why a line could not be opened."""
    if isinstance(exc, termios.error) and conn is not None:
        msg = exc.args[1] if len(exc.args) > 1 else exc
        return (
            f"the port refused {conn.baudrate} baud, {conn.bytesize} data bits, "
            f"parity {conn.parity}, {conn.stopbits} stop bit(s): {msg}"
        )
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _close_orphaned_ports(exc: BaseException) -> None:
    """Close a serial port that a failed open left behind in the traceback's frames.

    pymodbus opens the port and then reconfigures it inside its transport's constructor;
    when that raises, the open port is reachable only from the traceback and keeps its
    exclusive lock until the garbage collector finds it, so the next attempt would fail
    with "Could not exclusively lock port".
    """
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        for port in (owner, getattr(owner, "sync_serial", None)):
            if isinstance(port, serial.SerialBase):
                with contextlib.suppress(Exception):
                    port.close()
        tb = tb.tb_next


def _serial_cause(conn: ModbusConnection) -> str:
    """Why pymodbus could not open a serial port: it logs the error and returns False.

    Opening the port once more with the same settings raises the error it swallowed;
    this runs only after a failed attempt, and closes what it opened.
    """
    try:
        port = serial.serial_for_url(
            conn.serial_port,
            exclusive=True,
            baudrate=conn.baudrate,
            bytesize=conn.bytesize,
            parity=conn.parity,
            stopbits=conn.stopbits,
            timeout=0,
        )
    except Exception as exc:
        return _cause(exc)
    port.close()
    return ""


def _current() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


# (event loop, line key) -> Line. Keyed by loop too: a lock belongs to one loop.
_POOL: dict[tuple[int, str], Line] = {}


def acquire_line(conn: ModbusConnection, device: str) -> Line:
    """The line for ``conn`` (created on first use); ``device`` becomes one of its users."""
    key = conn.line_key
    pool_key = (id(asyncio.get_running_loop()), key)
    line = _POOL.get(pool_key)
    if line is None:
        line = Line(key, conn, device)
        line.pool_key = pool_key
        _POOL[pool_key] = line
    else:
        for f in _LINE_FIELDS:
            mine, theirs = getattr(conn, f), getattr(line.conn, f)
            if mine != theirs:
                raise ConfigError(
                    f"device '{device}': shares line {key} with device "
                    f"'{line.first_device}' but sets {f}={mine!r} (the line has {theirs!r})"
                )
    line.users.append(device)
    return line


def release_line(line: Line, device: str) -> None:
    """``device`` no longer uses ``line``; the last user closes it."""
    if device in line.users:
        line.users.remove(device)
    if line.users:
        return
    line.close()
    # By its key, not by a search: thousands of devices reconnecting would each walk the pool.
    if _POOL.get(line.pool_key) is line:
        del _POOL[line.pool_key]


def open_lines() -> int:
    """How many lines are open in this process (for metrics and tests)."""
    return len(_POOL)
