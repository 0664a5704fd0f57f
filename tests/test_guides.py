"""The README's guides, run as written against real servers on loopback.

Blocks preceded by ``<!-- guide: NAME -->`` are shell commands, run in order in one bash
session; ``<!-- guide: NAME file: PATH -->`` blocks are written to PATH first. The ``iiot``
command is the one of the wheel ``make dist`` builds, installed into a virtual
environment. Only what the README's "Guides" section lists is changed: ports, device
addresses, paths, the ``iiot`` user, and systemd's part (starting and reloading the broker).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iiot_common.localservers import (
    DebianMosquitto,
    VictoriaMetrics,
    free_port,
    require,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_MARK = re.compile(
    r"<!-- guide: (?P<name>[a-z]+)(?: file: (?P<file>\S+))? -->\n```\w*\n(?P<body>.*?)```", re.S
)


def guide(name: str) -> tuple[dict[str, str], str]:
    """(files to write, shell script) of one guide, in README order."""
    files: dict[str, str] = {}
    script: list[str] = []
    for m in _MARK.finditer(README.read_text(encoding="utf-8")):
        if m["name"] != name:
            continue
        if m["file"]:
            files[m["file"]] = m["body"]
        else:
            script.append(m["body"])
    assert script, f"README has no '{name}' guide blocks"
    return files, "\n".join(script)


@pytest.fixture(scope="session")
def wheel_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a virtual environment with the wheel ``make dist`` builds.

    The wheel goes in without its dependencies, which the environment finds in the test
    environment's site-packages (a .pth line); the ``iiot`` package and command are the
    wheel's, not the source tree's.
    """
    dist = tmp_path_factory.mktemp("dist")
    made = subprocess.run(
        ["make", "-C", str(ROOT), "dist", f"DIST={dist}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    wheels = sorted(dist.glob("iiot-*.whl"))
    assert len(wheels) == 1 and len(list(dist.glob("iiot-*.tar.gz"))) == 1, list(dist.iterdir())
    venv = tmp_path_factory.mktemp("venv") / "iiot"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_iiot_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheels[0])],
        check=True,
    )  # fmt: skip
    where = subprocess.run(
        [venv / "bin" / "iiot", "--help"], capture_output=True, text=True, check=False
    )
    assert where.returncode == 0, where.stderr
    origin = subprocess.run(
        [python, "-c", "import gateway, iiot; print(gateway.__file__, iiot.__file__)"],
        cwd=venv,  # not the source tree, which "python -c" would put first on sys.path
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert origin.count(site) == 2, f"iiot is not the wheel's: {origin}"
    return venv / "bin"


def run_guides(
    names: list[str],
    workdir: Path,
    replace: dict[str, str],
    *,
    bin_dir: Path,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Write the guides' files, then run their commands in one bash session."""
    parts = []
    for name in names:
        files, script = guide(name)
        for rel, body in files.items():
            for old, new in replace.items():
                body = body.replace(old, new)
                rel = rel.replace(old, new)
            path = workdir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
        parts.append(script)
    script = "\n".join(parts)
    for old, new in replace.items():
        script = script.replace(old, new)
    # Background commands of the guide (gateway, agent, simulator) stop with the session.
    wrapped = (
        "set -euo pipefail\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT\n" + script
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}:/usr/sbin:/sbin"}
    return subprocess.run(
        ["bash", "-c", wrapped],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sim(profile: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "iiot", "sim", "run", "--profile", profile, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def shipped_broker() -> Iterator[DebianMosquitto]:
    """Debian's Mosquitto with deploy/mosquitto.conf, laid out but not started."""
    # Under a folder the broker's own user can reach (pytest's tmp_path is root-only).
    base = Path(tempfile.mkdtemp(prefix="iiot-guide-"))
    base.chmod(0o755)
    broker = DebianMosquitto(base / "root", ROOT / "deploy" / "mosquitto.conf").prepare()
    yield broker
    broker.stop()
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _reload_on_change(broker: DebianMosquitto, stop: threading.Event) -> None:
    """What iiot-broker-reload.path does: SIGHUP the broker when an auth file changes."""
    files = [broker.etc / "iiot" / "passwd", broker.etc / "iiot" / "acl"]
    pid_file = broker.root / "run" / "mosquitto" / "mosquitto.pid"
    seen: list[tuple[int, int] | None] = []
    while not stop.wait(0.1):
        now = [(st.st_ino, st.st_mtime_ns) if (st := _stat(f)) else None for f in files]
        if seen and now != seen and pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
            except (ValueError, ProcessLookupError):
                continue  # the broker is (re)starting; the next round retries
        seen = now


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def test_platform_factory_and_integrator_guides(
    tmp_path: Path,
    shipped_broker: DebianMosquitto,
    victoria: VictoriaMetrics,
    wheel_bin: Path,
) -> None:
    """The three guides in one session: the integrator sends its model to the factory's box."""
    require("curl", "curl")
    broker = shipped_broker
    work = tmp_path / "guide"
    work.mkdir()
    api_port, kiln_port, comp_port, sim_port = free_port(), free_port(), free_port(), free_port()
    conf = broker.etc / "mosquitto.conf"
    start_broker = (
        f"{broker.binary} -c {conf} &\n"
        f"python3 -c 'from iiot_common.localservers import wait_port; "
        f"wait_port({broker.tls_port})'"
    )
    replace = {
        # paths
        "/etc/iiot/": f"{work}/etc-iiot/",
        "/var/lib/iiot-gateway": f"{work}/gateway-data",
        "/var/lib/iiot-agent": f"{work}/agent-data",
        **{p: broker.move(p) for p in ("/etc/mosquitto/", "/var/lib/mosquitto/")},
        # ports
        "127.0.0.1:8883": f"127.0.0.1:{broker.tls_port}",
        "127.0.0.1:8080": f"127.0.0.1:{api_port}",
        "port: 8080": f"port: {api_port}",
        "127.0.0.1:8086": f"127.0.0.1:{victoria.port}",
        "host: 192.168.10.21, port: 502": f"host: 127.0.0.1, port: {kiln_port}",
        "host: 192.168.10.22, port: 502": f"host: 127.0.0.1, port: {comp_port}",
        "hosts: [192.168.10.22], ports: [502]": f"hosts: [127.0.0.1], ports: [{comp_port}]",
        "--port 502": f"--port {sim_port}",
        "host: 127.0.0.1, port: 502": f"host: 127.0.0.1, port: {sim_port}",
        # systemd's part, and the iiot user (the test runs as root); last, so the paths
        # these insert are not moved twice
        "systemctl restart mosquitto": start_broker,
        "systemctl enable --now iiot-broker-reload.path": ": the test reloads the broker",
        "--owner iiot": "--owner root",
        "chgrp iiot ": "chgrp root ",
        "chown iiot ": "chown root ",
    }
    stop = threading.Event()
    watcher = threading.Thread(target=_reload_on_change, args=(broker, stop), daemon=True)
    watcher.start()
    sims = [_sim("kiln-rotary-cement", kiln_port), _sim("aircomp-screw", comp_port)]
    try:
        proc = run_guides(
            ["platform", "factory", "integrator"], work, replace, bin_dir=wheel_bin, timeout=420
        )
    finally:
        stop.set()
        watcher.join(5)
        for s in sims:
            s.terminate()
            s.wait(10)
        _stop_pid_file(broker)
    log = broker.log.read_text(errors="replace")[-3000:] if broker.log.exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:] + log

    # The broker ran as its own user, over TLS, and read the files the gateway wrote.
    assert "as iiot-gateway-1 (" in log and "u'iiot-gateway-1'" in log, log
    assert "as sjz-line1-edge (" in log, log

    # Platform: ratios by city answer, and the report has its bilingual headers.
    assert '"group_by":"city"' in proc.stdout.replace(" ", "") or "130100" in proc.stdout
    report = (work / "connection.csv").read_bytes()
    assert report.startswith(b"\xef\xbb\xbf")
    assert "联网设备总量" in report.decode("utf-8-sig")
    # Platform: the targets set, and the progress against them (nothing connected yet).
    on_cloud = json.loads((work / "on-cloud.json").read_text())
    city = {g["key"]: g for g in on_cloud["groups"]}["130100"]
    assert (city["registered"], city["on_cloud"], city["target"]) == (1, 0, 8000)
    assert (on_cloud["overall"]["target"], on_cloud["overall"]["progress"]) == (100000, 0.0)

    # Factory: the agent's file names no device; one was pushed, one found and approved.
    agent_yaml = (work / "etc-iiot" / "agent.yaml").read_text()
    assert "devices" not in agent_yaml and "remote_config" in agent_yaml, agent_yaml
    (proposal,) = json.loads((work / "discovered.json").read_text())
    assert proposal["candidates"][0]["profile"] == "aircomp-screw", proposal
    # The two devices the agent polls are online, the ledger's other three are not.
    devices = json.loads((work / "devices.json").read_text())
    items = devices.get("items", devices.get("devices", []))
    online = {d["id"] for d in items if d["online"]}
    assert online == {"sjz-kiln-1", "sjz-aircomp-1"}
    assert len(items) == 5

    # The time series reached the InfluxDB-compatible store.
    series = victoria.export('{__name__=~"telemetry_.*", device="sjz-kiln-1"}')
    assert series, "no telemetry for sjz-kiln-1 in victoria-metrics"

    # Integrator: the profiles validate, probe names the new model as the best fit, and the
    # model pushed with its profile reports from the factory's box.
    assert "ok" in proc.stdout and "acme-cc-500" in proc.stdout
    probe = (work / "probe.txt").read_text()
    best = [line for line in probe.splitlines() if "best" in line.lower()]
    assert best and "acme-cc-500" in best[0], probe
    cc500 = json.loads((work / "cc500.json").read_text())
    assert cc500["online"] and cc500["profile"] == "acme-cc-500", cc500
    assert cc500["latest"], cc500


def _stop_pid_file(broker: DebianMosquitto) -> None:
    """Stop a broker the guide started, should the session's own trap have missed it."""
    pid_file = broker.root / "run" / "mosquitto" / "mosquitto.pid"
    try:
        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
