"""A fleet of devices against a real Mosquitto: delivery rate, the broker's CPU, and latency from final to
database row.

Each device is its own process replaying finished transcripts through the real sinks (JsonlSink, the spool,
and MqttSink, the publisher) at a dictation rate: one final every 2-6 s. `edge-asr collect` stores them in
SQLite. Everything runs on 127.0.0.1.

    python benchmarks/fleet.py --devices 20 --seconds 300
    python benchmarks/fleet.py --devices 20 --seconds 60 --gap 0.01,0.02     # the throughput ceiling
    python benchmarks/fleet.py device --journal DIR/d01.jsonl --port 1883 --device-id d01 --seconds 60

The tests (tests/test_mqtt.py) use `Mosquitto` and `run_fleet` from here with 3 devices for 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

# Maintenance dictation, written for this benchmark.
PHRASES = [
    "Bearing noise on spindle two, schedule an inspection for Thursday.",
    "Oil level on the gearbox is low, topped up with two litres.",
    "Forklift seven has a flat tyre, parked at bay eleven.",
    "Replaced the worn belt on the sorter, tension checked.",
    "Temperature alarm on oven three cleared after the fan reset.",
    "Safety guard on the shear was loose, tightened and logged.",
    "Compressor pressure dropped to six bar during the morning run.",
    "Label printer jammed twice, the roller needs cleaning.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A Mosquitto broker of its own on a loopback port, persistent, in `directory`. `extra` adds lines to
    its configuration (TLS, password file)."""

    def __init__(self, directory: Path, port: int | None = None, extra: str = ""):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed (./setup.sh installs it with apt-get)")
        self.exe, self.dir = exe, Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        user = (
            f"user {os.environ.get('USER') or 'root'}\n" if os.geteuid() == 0 else ""
        )  # root would drop to 'mosquitto'
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n{extra or 'allow_anonymous true'}\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
            f"log_dest file {self.dir}/mosquitto.log\n{user}"
        )
        self.process = None

    def start(self) -> "Mosquitto":
        self.process = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited: {self.process.stderr.read().strip()} "
                    + (log.read_text()[-500:] if (log := self.dir / "mosquitto.log").exists() else "")
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_device(journal: Path, port: int, device_id: str, seconds: float, gap=(2.0, 6.0), seed: int = 0) -> int:
    """One device: finals at dictation rate through the real sinks, then a clean stop. Returns the count."""
    from edge_asr.service.broker import BrokerSettings
    from edge_asr.service.publisher import MqttSettings, MqttSink
    from edge_asr.service.sinks import JsonlSink, timestamped

    rng = random.Random(seed)
    sink = JsonlSink(journal, device_id=device_id)
    settings = MqttSettings(
        BrokerSettings("127.0.0.1", port),
        device_id,
        reconnect_min=0.2,
        reconnect_max=2.0,
        drain_seconds=10.0,
        describe={"version": "fleet-bench"},
    )
    mqtt = MqttSink(settings, sink).start()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *a: stop.update(now=True))
    t, n, end = 0.0, 0, time.monotonic() + seconds
    while not stop["now"]:
        pause = rng.uniform(*gap)
        if time.monotonic() + pause > end:
            break
        time.sleep(pause)
        length = rng.uniform(1.5, 5.0)
        sink.write(timestamped({"text": rng.choice(PHRASES), "start_s": round(t, 3), "end_s": round(t + length, 3)}))
        t += length + pause
        n += 1
    sink.close()
    mqtt.close()
    return n


def run_fleet(workdir: Path, port: int, devices: int, seconds: float, db: Path, gap=(2.0, 6.0)) -> dict:
    """Run `devices` device processes for `seconds` while `edge-asr collect` stores into `db`; wait for
    every final to arrive. Returns what was sent and what arrived."""
    workdir.mkdir(parents=True, exist_ok=True)
    collect = subprocess.Popen(
        [sys.executable, "-m", "edge_asr", "collect", "--broker", f"127.0.0.1:{port}", "--db", str(db)],
        stderr=subprocess.PIPE,
        text=True,
    )
    procs = []
    try:
        wait_for(lambda: db.exists(), 15, "collect did not start")
        time.sleep(0.5)  # its subscription is in place
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "device",
                    "--journal",
                    str(workdir / f"d{i:02d}.jsonl"),
                    "--port",
                    str(port),
                    "--device-id",
                    f"d{i:02d}",
                    "--seconds",
                    str(seconds),
                    "--seed",
                    str(i),
                    "--gap",
                    f"{gap[0]},{gap[1]}",
                ],
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(devices)
        ]
        for p in procs:
            if p.wait(timeout=seconds + 60) != 0:
                raise RuntimeError(f"a device failed: {p.stderr.read()[-1000:]}")
        sent = {}
        for i in range(devices):
            for line in (workdir / f"d{i:02d}.jsonl").read_text().splitlines():
                r = json.loads(line)
                sent[r["id"]] = r
        wait_for(lambda: _count(db) >= len(sent), 30, f"collect stored fewer than {len(sent)} rows")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        collect.send_signal(signal.SIGTERM)
        try:
            collect.wait(timeout=30)
        except subprocess.TimeoutExpired:
            collect.kill()
    with sqlite3.connect(db) as con:
        rows = {r[0]: r[1:] for r in con.execute("SELECT id, text, time, received, duplicates FROM transcripts")}
    latencies = [rows[i][2] - datetime.fromisoformat(r["time"]).timestamp() for i, r in sent.items() if i in rows]
    first = min(datetime.fromisoformat(r["time"]).timestamp() for r in sent.values())
    span = max(r[2] for r in rows.values()) - first  # from the first final made to the last row stored
    return {
        "sent": sent,
        "rows": rows,
        "latencies": np.array(latencies),
        "span": span,
        "lost": sorted(set(sent) - set(rows)),
        "duplicates": sum(r[3] for r in rows.values()),
    }


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT count(*) FROM transcripts").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(condition, timeout: float, message: str = "timed out") -> None:
    """Poll `condition` until it holds; AssertionError with `message` after `timeout` seconds (the tests'
    failure, and the benchmark's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(message)


def _gap(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("device", help="one replaying device (run by the benchmark)")
    d.add_argument("--journal", type=Path, required=True)
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--device-id", required=True)
    d.add_argument("--seconds", type=float, default=60)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--gap", default="2,6")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument(
        "--gap",
        default="2,6",
        help="seconds between a device's finals, MIN,MAX (default 2,6: "
        "dictation; 0.01,0.02 for the throughput ceiling)",
    )
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edge-asr-fleet"))
    args = parser.parse_args()
    if args.command == "device":
        run_device(args.journal, args.port, args.device_id, args.seconds, _gap(args.gap), seed=args.seed)
        return 0

    shutil.rmtree(args.workdir, ignore_errors=True)
    broker = Mosquitto(args.workdir / "broker").start()
    try:
        cpu0, t0 = broker.cpu_seconds(), time.monotonic()
        result = run_fleet(
            args.workdir / "devices",
            broker.port,
            args.devices,
            args.seconds,
            args.workdir / "fleet.sqlite",
            _gap(args.gap),
        )
        cpu, wall = broker.cpu_seconds() - cpu0, time.monotonic() - t0
    finally:
        broker.stop()
    n, lat = len(result["sent"]), result["latencies"] * 1000
    print(
        "| devices | seconds | gap s | finals sent | stored | lost | duplicates | stored msg/s | broker CPU % | "
        "latency p50 ms | p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.devices} | {args.seconds:g} | {args.gap.replace(',', '-')} | {n} | {len(result['rows'])} | "
        f"{len(result['lost'])} | "
        f"{result['duplicates']} | {n / result['span']:.2f} | {100 * cpu / wall:.2f} | "
        f"{np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} |"
    )
    return 0 if not result["lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
