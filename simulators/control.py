"""A small HTTP control API for running simulators, on loopback.

::

    GET    /devices               every served device: id, profile, endpoint, fault, requests
    GET    /devices/{id}          one device
    PUT    /devices/{id}/fault    body {"mode": "silent", "delay": 2, "code": 4}
    DELETE /devices/{id}/fault    back to normal

Plain asyncio (no web framework): one request per connection, bodies up to 64 KiB, and
a timeout on every read so a stuck client cannot hold the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from pydantic import ValidationError

from simulators.plant import Endpoint, FaultConfig, Plant

__all__ = ["ControlServer", "device_status"]

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024
_MAX_HEADERS = 100
_READ_TIMEOUT = 5.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    500: "Internal Server Error",
}


def device_status(plant: Plant, device_id: str) -> dict[str, Any]:
    """What the control API reports about one served device."""
    ep: Endpoint = plant.endpoints[device_id]
    dev = plant.devices[device_id]
    faults = dev.faults
    return {
        "id": device_id,
        "enterprise": ep.enterprise,
        "profile": ep.profile,
        "protocol": ep.protocol,
        "host": ep.host,
        "port": ep.port,
        "unit": ep.unit,
        "serial_port": ep.serial_port,
        "endpoint": ep.url,
        "fault": {
            "mode": faults.mode.value,
            "delay": faults.delay,
            "code": faults.exception_code,
        },
        "requests": dev.requests,
    }


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ControlServer:
    """Serve the control API for ``plant`` on ``host:port`` (``port=0`` picks one)."""

    def __init__(self, plant: Plant, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.plant = plant
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self.requests = 0
        self.errors = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        if self.port == 0:
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        try:
            try:
                method, path, body = await asyncio.wait_for(
                    self._read(reader), timeout=_READ_TIMEOUT
                )
                status, doc = self._route(method, path, body)
            except TimeoutError:
                status, doc = 408, {"error": "request not received in time"}
            except _HttpError as exc:
                status, doc = exc.status, {"error": exc.message}
            except Exception as exc:
                log.exception("control request failed")
                status, doc = 500, {"error": f"internal error: {exc}"}
            if status >= 400:
                self.errors += 1
            payload = json.dumps(doc, ensure_ascii=False).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head + payload)
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.drain(), timeout=_READ_TIMEOUT)
        except (ConnectionError, TimeoutError):
            self.errors += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=_READ_TIMEOUT)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        line = (await reader.readline()).decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _HttpError(400, f"malformed request line {line[:80]!r}")
        method, target = parts[0].upper(), parts[1]
        length = 0
        for _ in range(_MAX_HEADERS):
            header = (await reader.readline()).decode("latin-1").strip()
            if not header:
                break
            name, _, value = header.partition(":")
            if name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise _HttpError(400, "Content-Length is not a number") from None
        else:
            raise _HttpError(400, f"more than {_MAX_HEADERS} headers")
        if length < 0 or length > _MAX_BODY:
            raise _HttpError(413, f"body larger than {_MAX_BODY} bytes")
        body = await reader.readexactly(length) if length else b""
        return method, target.split("?", 1)[0], body

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts == ["devices"]:
            if method != "GET":
                raise _HttpError(405, f"{method} not allowed on /devices")
            return 200, [device_status(self.plant, d) for d in self.plant.endpoints]
        if len(parts) in (2, 3) and parts[0] == "devices":
            device_id = parts[1]
            if device_id not in self.plant.endpoints:
                raise _HttpError(404, f"no served device '{device_id}'")
            if len(parts) == 2:
                if method != "GET":
                    raise _HttpError(405, f"{method} not allowed on {path}")
                return 200, device_status(self.plant, device_id)
            if parts[2] == "fault":
                return self._fault(method, device_id, body)
        raise _HttpError(404, f"no such resource {path}")

    def _fault(self, method: str, device_id: str, body: bytes) -> tuple[int, Any]:
        faults = self.plant.devices[device_id].faults
        if method == "DELETE":
            faults.clear()
        elif method == "PUT":
            try:
                data = json.loads(body or b"null")
                fault = FaultConfig.model_validate(data)
            except json.JSONDecodeError as exc:
                raise _HttpError(400, f"body is not JSON: {exc.msg}") from None
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise _HttpError(400, f"bad fault for device '{device_id}': {problems}") from None
            faults.set(fault.mode, delay=fault.delay, code=fault.code)
        else:
            raise _HttpError(405, f"{method} not allowed on a fault (PUT or DELETE)")
        log.info(
            "fault changed",
            extra={"device": device_id, "mode": faults.mode.value, "delay": faults.delay},
        )
        return 200, device_status(self.plant, device_id)
