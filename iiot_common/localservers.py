"""Real servers on loopback for tests and benchmarks: Mosquitto, PostgreSQL,
victoria-metrics, socat ptys.

Each is started on a free port in a folder of the caller's and stopped by ``stop()``. When
a Debian package is missing and we are root, it is installed; otherwise ``require`` raises
``ServerUnavailable`` naming the package (the test suite turns that into a skip).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DebianMosquitto",
    "Mosquitto",
    "PostgreSQL",
    "PtyPair",
    "ServerUnavailable",
    "VictoriaMetrics",
    "ephemeral_low",
    "free_port",
    "require",
    "running",
    "wait_port",
    "which",
]

_SBIN = ["/usr/sbin", "/usr/local/sbin", "/sbin"]
_apt_updated = False


class ServerUnavailable(RuntimeError):
    """A server's program is missing and cannot be installed here; names the package."""


def _terminate(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """Stop a server process: SIGTERM, then SIGKILL if it is still there after ``grace`` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (32768 if unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Below the kernel's ephemeral range: a server is often started well after its port is
    chosen (a broker brought back after an outage), and meanwhile an outgoing connection,
    even a client retrying against that very port, could be given it as its own.
    """
    high = ephemeral_low() - 1
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(high, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Return once something accepts TCP connections on ``host:port``; else TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def which(cmd: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(cmd, path=path)


def require(cmd: str, package: str) -> str:
    """Path of ``cmd``, installing Debian ``package`` when missing and root.

    Raises ``ServerUnavailable`` when it is still missing.
    """
    global _apt_updated
    found = which(cmd)
    if found:
        return found
    if os.geteuid() == 0 and which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
            _apt_updated = True
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
            check=False,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        found = which(cmd)
        if found:
            return found
    raise ServerUnavailable(f"needs the Debian package '{package}' (apt-get install -y {package})")


class Mosquitto:
    """A Mosquitto broker on 127.0.0.1:port, anonymous by default.

    With ``password_file``/``acl_file`` it requires authentication and applies the ACL;
    ``reload()`` makes it re-read both (SIGHUP), as the gateway does after provisioning.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
    ) -> None:
        self.binary = require("mosquitto", "mosquitto")
        self.workdir = workdir
        self.port = port or free_port()
        self.password_file = password_file
        self.acl_file = acl_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = [
            "user root",
            "persistence false",
            f"listener {self.port} 127.0.0.1",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        self._write_conf()
        logf = self.log.open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=logf, stderr=logf)
        wait_port(self.port)
        return self

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None


# Debian's /etc/mosquitto/mosquitto.conf, used when the package's own file is not there.
_DEBIAN_MAIN_CONF = """\
pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""
_MOVED = ("/etc/mosquitto/", "/var/lib/mosquitto/", "/var/log/mosquitto/", "/run/mosquitto/")


class DebianMosquitto:
    """Debian's Mosquitto set-up with a ``conf.d`` file, ports and paths moved under ``root``.

    The package's main ``mosquitto.conf`` includes ``conf_file`` from ``conf.d``; every
    path under /etc/mosquitto, /var/lib/mosquitto, /var/log/mosquitto and /run/mosquitto
    is moved under ``root``, ``listener 8883`` and ``listener 1883`` to free ports. Started
    as root, Mosquitto drops to its own ``mosquitto`` user, as the Debian service does.
    """

    def __init__(
        self, root: Path, conf_file: Path, *, conf_name: str = "iiot.conf", user: str = "mosquitto"
    ) -> None:
        self.binary = require("mosquitto", "mosquitto")
        if os.geteuid() != 0:
            raise ServerUnavailable("Mosquitto drops to its own user only when started as root")
        import pwd

        try:
            self._uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ServerUnavailable(f"no '{user}' user (install the Debian package)") from None
        self.root = root
        self.conf_file = conf_file
        self.conf_name = conf_name
        self.tls_port = free_port()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.etc = root / "etc/mosquitto"
        self.log = root / "var/log/mosquitto/mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def move(self, text: str) -> str:
        """``text`` with Mosquitto's paths and ports moved as this broker has them."""
        for path in _MOVED:
            text = text.replace(path, f"{self.root}{path}")
        text = re.sub(r"(?m)^listener 8883\b", f"listener {self.tls_port}", text)
        return re.sub(r"(?m)^listener 1883\b", f"listener {self.port}", text)

    def prepare(self) -> DebianMosquitto:
        """Lay out the folders and config files as the package does; no auth files yet."""
        self.root.mkdir(parents=True, exist_ok=True)
        for parent in self.root.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise ValueError(f"{parent} must be searchable by others (the broker's user)")
        self.root.chmod(0o755)
        for sub in ("etc/mosquitto/conf.d", "etc/mosquitto/certs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("var/lib/mosquitto", "var/log/mosquitto", "run/mosquitto"):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, self._uid, -1)
        for d in (self.root, *self.root.rglob("*")):
            if d.is_dir():
                d.chmod(d.stat().st_mode | 0o755)
        main = Path("/etc/mosquitto/mosquitto.conf")
        main_text = main.read_text() if main.is_file() else _DEBIAN_MAIN_CONF
        (self.etc / "mosquitto.conf").write_text(self.move(main_text))
        (self.etc / "conf.d" / self.conf_name).write_text(self.move(self.conf_file.read_text()))
        return self

    def start(self, timeout: float = 10.0) -> DebianMosquitto:
        conf = self.etc / "mosquitto.conf"
        text = (self.etc / "conf.d" / self.conf_name).read_text()
        port = self.port if f"listener {self.port}" in text else self.tls_port
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {err}{log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not listen on {port} within {timeout}s")

    def reload(self) -> None:
        """SIGHUP: re-read the password and ACL files."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        _terminate(self.proc)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def _pg_bindir() -> Path:
    """Debian's PostgreSQL programs folder (the newest version), installing it when root."""

    def found() -> list[str]:
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)

    if not found():
        with contextlib.suppress(ServerUnavailable):
            require("pg_ctlcluster", "postgresql")
    paths = found()
    if not paths:
        raise ServerUnavailable(
            "needs the Debian package 'postgresql' (apt-get install -y postgresql)"
        )
    return Path(paths[-1]).parent


def _version_key(path: str) -> int:
    digits = path.split("/")[4]
    return int(digits) if digits.isdigit() else 0


class PostgreSQL:
    """A PostgreSQL server on 127.0.0.1:port, its data and socket folders in a tmp folder.

    PostgreSQL refuses to run as root, so as root it runs as ``user`` (Debian's package
    makes ``postgres``). Authentication is ``trust`` on loopback only; the durability
    settings are off (a test server). ``create_database()`` gives each caller its own
    empty database on the one server.
    """

    def __init__(self, *, port: int | None = None, user: str = "postgres") -> None:
        self.bindir = _pg_bindir()
        self.port = port or free_port()
        self._user: str | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                self._uid = pwd.getpwnam(user).pw_uid
            except KeyError:
                raise ServerUnavailable(f"no '{user}' user to run PostgreSQL as") from None
            self._user = user
        self.workdir: Path | None = None
        self.proc_started = False
        self._names = itertools.count(1)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``iiot`` database (psycopg 3)."""
        return self.url_of("iiot")

    def url_of(self, database: str) -> str:
        return f"postgresql+psycopg://iiot@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self._user,
            capture_output=True,
            check=False,
            cwd="/",
        )
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{args[0]} exited {done.returncode}: {out}")

    def start(self) -> PostgreSQL:
        # Not under the caller's folder: pytest's are private to root, the server's user
        # must reach its own files.
        self.workdir = Path(tempfile.mkdtemp(prefix="iiot-pg-"))
        if self._user is not None:
            os.chown(self.workdir, self._uid, -1)
        data = self.workdir / "data"
        self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            "iiot",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(self.workdir / "postgresql.log"),
            "-w",
            "-t",
            "60",
            "-o",
            " ".join(
                (
                    f"-p {self.port}",
                    f"-k {self.workdir}",
                    "-c listen_addresses=127.0.0.1",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                )
            ),
            "start",
        )
        self.proc_started = True
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "iiot", "iiot")
        return self

    def create_database(self) -> str:
        """A new empty database on this server; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "iiot", name)
        return self.url_of(name)

    def stop(self) -> None:
        if self.workdir is None:
            return
        if self.proc_started:
            with contextlib.suppress(RuntimeError):
                self._run(
                    "pg_ctl", "-D", str(self.workdir / "data"), "-m", "immediate", "-w", "stop"
                )
            self.proc_started = False
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None


class VictoriaMetrics:
    """victoria-metrics on 127.0.0.1:port; accepts InfluxDB line protocol on /api/v2/write."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.binary = require("victoria-metrics", "victoria-metrics")
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "victoria-metrics.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VictoriaMetrics:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"-storageDataPath={self.workdir / 'vm-data'}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y",
                "-search.disableCache",
                "-loggerLevel=ERROR",
            ],
            stdout=logf,
            stderr=logf,
        )
        wait_port(self.port, timeout=20)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.1)
        raise TimeoutError("victoria-metrics did not become healthy")

    def stop(self) -> None:
        _terminate(self.proc, grace=10)
        self.proc = None

    def flush(self) -> None:
        """Make recently written samples visible to queries and exports."""
        with urllib.request.urlopen(self.url + "/internal/force_flush", timeout=5):
            pass

    def export(self, match: str = '{__name__=~"telemetry_.*"}') -> list[dict[str, object]]:
        """Every stored series matching ``match`` (JSON lines of /api/v1/export)."""
        import json
        import urllib.parse

        self.flush()
        q = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=30) as r:
            body = r.read().decode()
        return [json.loads(line) for line in body.splitlines() if line.strip()]


class PtyPair:
    """Two linked pseudo-terminals made by socat: what one end writes, the other reads."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require("socat", "socat")
        self.a = str(workdir / "ttyA")
        self.b = str(workdir / "ttyB")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PtyPair:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-d",
                f"pty,raw,echo=0,link={self.a}",
                f"pty,raw,echo=0,link={self.b}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(self.a) and os.path.exists(self.b):
                return self
            time.sleep(0.05)
        raise TimeoutError("socat did not create the pty pair")

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None


@contextlib.contextmanager
def running(server: Mosquitto | VictoriaMetrics | PtyPair) -> Iterator[object]:
    server.start()
    try:
        yield server
    finally:
        server.stop()
