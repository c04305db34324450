"""Transcripts to an MQTT broker, at least once: the spool, the publisher and `collect`, against a real
Mosquitto on a loopback port (installed by setup.sh), with persistence, through outages, rotation, SIGKILL,
TLS and passwords. Every process these tests start is stopped within a bounded wait."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edge_asr.errors import EdgeAsrError
from edge_asr.service.sinks import JsonlSink, timestamped
from edge_asr.service.spool import OffsetFile

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from fleet import Mosquitto, free_port, run_fleet, wait_for  # noqa: E402

pytest.importorskip("paho.mqtt.client", reason="the mqtt extra (setup.sh installs it)")


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop(signal.SIGKILL)


def _collect(port, db, *extra):
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_asr", "collect", "--broker", f"127.0.0.1:{port}", "--db", str(db), *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(process)
    wait_for(lambda: db.exists() or process.poll() is not None, 15)
    time.sleep(0.5)  # subscribed
    assert process.poll() is None, process.stderr.read()
    return process


def _stop(process, timeout=30):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.stderr.read() if process.stderr else ""


def _rows(db):
    if not db.exists():
        return {}
    with sqlite3.connect(db) as con:
        return {r[0]: r[1:] for r in con.execute("SELECT id, text, time, start_s, end_s, duplicates FROM transcripts")}


def _journal(path):
    """Every record in the JSONL file and its rotated backups, by id."""
    records = {}
    for p in sorted(path.parent.glob(path.name + "*")):
        if p.name == path.name or p.name[len(path.name) + 1 :].isdigit():
            for line in p.read_text().splitlines():
                r = json.loads(line)
                assert r["id"] not in records
                records[r["id"]] = r
    return records


def _daemon_config(tmp_path, source, bundle, port, realtime=True, status_port=None, extra_output="", extra_mqtt=""):
    config = tmp_path / "edge-asr.toml"
    config.write_text(
        f'[input]\nsource = "{source}"\nrealtime = {str(realtime).lower()}\n[model]\nbundle = "{bundle}"\n'
        f'[output]\njsonl = "{tmp_path / "out.jsonl"}"\n{extra_output}\n'
        f'[status]\nlisten = "127.0.0.1:{status_port or 0}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ndevice_id = "press-4"\nreconnect_max = 2.0\n'
        f"counters_interval = 1.0\n{extra_mqtt}\n"
    )
    return config


def _daemon(config):
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_asr", "daemon", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(process)
    return process


def _assert_delivered(journal, db, timeout=30):
    wait_for(
        lambda: set(_journal(journal)) <= set(_rows(db)),
        timeout,
        f"lost: {sorted(set(_journal(journal)) - set(_rows(db)))}",
    )
    rows = _rows(db)
    for i, r in _journal(journal).items():
        assert rows[i][:4] == (r["text"], r["time"], r["start_s"], r["end_s"])
    return rows


# -- the spool without a broker ---------------------------------------------------------------------------


def test_ids_continue_after_restart_and_a_torn_line_is_cut(tmp_path):
    path = tmp_path / "t.jsonl"
    sink = JsonlSink(path, device_id="pi-7")
    first = [sink.write({"text": f"line {i}"}) for i in range(3)]
    sink.close()
    assert [r["id"] for r in first] == ["pi-7:1", "pi-7:2", "pi-7:3"] and first[0]["schema"] == 1
    with open(path, "a") as f:
        f.write('{"schema": 1, "id": "pi-7:4", "seq": 4, "te')  # a power cut in the middle of a line
    sink = JsonlSink(path, device_id="pi-7")
    assert sink.write({"text": "after"})["seq"] == 4
    sink.close()
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    record = timestamped({"text": "x"})
    assert record["time"].endswith("+00:00") and record["clock_synced"] in (True, False, None)


def test_rotation_keeps_unsent_files_until_they_are_acknowledged(tmp_path, broker):
    from edge_asr.service.broker import BrokerSettings
    from edge_asr.service.publisher import MqttSettings, MqttSink

    path, db = tmp_path / "t.jsonl", tmp_path / "fleet.sqlite"
    collect = _collect(broker.port, db)  # its durable session outlives the broker's restart
    sink = mqtt = None
    try:
        broker.stop()  # the broker is down while the log rotates past its backups
        sink = JsonlSink(path, max_bytes=700, backups=1, device_id="pi-7")
        mqtt = MqttSink(
            MqttSettings(
                BrokerSettings("127.0.0.1", broker.port), "pi-7", reconnect_min=0.1, reconnect_max=0.5, drain_seconds=10
            ),
            sink,
        ).start()
        for i in range(30):
            sink.write(timestamped({"text": f"unsent line {i}", "start_s": float(i), "end_s": i + 0.5}))
        numbered = [p for p in tmp_path.glob("t.jsonl.*") if p.name.rsplit(".", 1)[1].isdigit()]
        assert len(numbered) > 3  # beyond `backups` = 1: nothing unsent was deleted
        assert mqtt.status()["backlog_lines"] == 30 and not mqtt.status()["connected"]
        broker.start()
        rows = _assert_delivered(path, db)
        assert len(rows) == 30
        for i in range(8):  # past max_bytes again, each line acknowledged before the next
            wait_for(lambda: mqtt.status()["backlog_lines"] == 0, 10)
            sink.write(timestamped({"text": f"after {i}", "start_s": 0.0, "end_s": 1.0}))
        _assert_delivered(path, db)
        wait_for(lambda: mqtt.status()["backlog_lines"] == 0, 10)
    finally:
        if mqtt:
            sink.close()
            mqtt.close()
        _stop(collect)
    backups = [p for p in tmp_path.glob("t.jsonl.*") if p.name.rsplit(".", 1)[1].isdigit()]
    assert len(backups) == 1  # acknowledged files beyond `backups` went at the next rotation
    assert OffsetFile(path).load().seq == 38


# -- the daemon, the real model, the real broker -----------------------------------------------------------


def test_delivery_status_and_counters(tmp_path, broker, stream_wav, bundle_int8):
    import paho.mqtt.client as mqtt

    db = tmp_path / "fleet.sqlite"
    collect = _collect(broker.port, db)
    process = _daemon(_daemon_config(tmp_path, stream_wav, bundle_int8, broker.port, realtime=False))
    assert process.wait(timeout=120) == 0, process.stderr.read()
    rows = _assert_delivered(tmp_path / "out.jsonl", db)
    assert len(rows) == 3 and all(r[-1] == 0 for r in rows.values())
    records = _journal(tmp_path / "out.jsonl")
    assert [r["seq"] for r in records.values()] == [1, 2, 3] and all(i.startswith("press-4:") for i in records)
    assert "Traceback" not in _stop(collect)

    retained = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-status")
    client.on_message = lambda c, u, m: retained.__setitem__(m.topic, json.loads(m.payload))
    client.connect("127.0.0.1", broker.port)
    client.subscribe("edge-asr/press-4/#")
    deadline = time.monotonic() + 10
    while len(retained) < 2 and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    assert retained["edge-asr/press-4/status"]["state"] == "offline"  # said on a clean stop
    assert retained["edge-asr/press-4/status"]["bundle"] == Path(bundle_int8).name
    assert retained["edge-asr/press-4/counters"]["mqtt"]["connected"] is True

    csv_path = tmp_path / "fleet.csv"
    out = subprocess.run(
        [sys.executable, "-m", "edge_asr", "collect", "--db", str(db), "--csv", str(csv_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and len(csv_path.read_text().splitlines()) == 4


@pytest.fixture(scope="module")
def long_stream_wav(stream, tmp_path_factory):
    """The three sentences five times over: about 70 s of dictation with pauses."""
    from edge_asr_build.speech.synth import write_wav

    path = tmp_path_factory.mktemp("long") / "long.wav"
    write_wav(path, np.concatenate([stream[0]] * 5))
    return path


def _status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        return json.loads(r.read())


def test_broker_outage_and_rotation_lose_nothing(tmp_path, broker, long_stream_wav, bundle_int8):
    """Mosquitto is stopped (SIGTERM) for 30 s while the daemon transcribes in real time; the JSONL file
    rotates meanwhile. Every final arrives, once in the database."""
    db, journal, status_port = tmp_path / "fleet.sqlite", tmp_path / "out.jsonl", free_port()
    collect = _collect(broker.port, db)
    process = _daemon(
        _daemon_config(
            tmp_path,
            long_stream_wav,
            bundle_int8,
            broker.port,
            status_port=status_port,
            extra_output="max_bytes = 1500\nbackups = 1",
        )
    )
    try:
        wait_for(lambda: len(_rows(db)) >= 1, 60, "nothing delivered before the outage")
        broker.stop(signal.SIGTERM)
        down_at = time.monotonic()
        wait_for(lambda: len(_journal(journal)) >= len(_rows(db)) + 3, 30, "no finals made during the outage")
        during = _status(status_port)["mqtt"]
        assert not during["connected"] and during["backlog_lines"] >= 3 and during["backlog_bytes"] > 0
        assert "unreachable" in during["last_error"] or "lost" in during["last_error"]
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        broker.start()
        assert process.wait(timeout=120) == 0
        rows = _assert_delivered(journal, db, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.stderr.read()
        _stop(collect)
    # Acknowledged backups were deleted by rotation (backups = 1), so the ids say what was made: 1..last.
    last = max(r["seq"] for r in _journal(journal).values())
    assert last >= 12 and set(rows) == {f"press-4:{i}" for i in range(1, last + 1)}
    assert all(r[-1] == 0 or r[-1] == 1 for r in rows.values())  # stored once; a resend is only counted
    assert len([p for p in tmp_path.glob("out.jsonl.*") if p.name[-1].isdigit()]) >= 1  # it did rotate
    assert "Traceback" not in stderr and 1 <= sum("mqtt broker" in line for line in stderr.splitlines()) <= 4


def test_sigkill_while_publishing_then_restart_loses_nothing(
    tmp_path, broker, long_stream_wav, stream_wav, bundle_int8
):
    db, journal = tmp_path / "fleet.sqlite", tmp_path / "out.jsonl"
    collect = _collect(broker.port, db)
    try:
        process = _daemon(_daemon_config(tmp_path, long_stream_wav, bundle_int8, broker.port))
        wait_for(lambda: len(_journal(journal)) >= 3, 60, "no finals")
        os.kill(process.pid, signal.SIGKILL)  # right after a line was appended: its PUBACK may be in flight
        process.wait(timeout=10)
        killed = _journal(journal)
        offset = OffsetFile(journal).load()
        wait_for(
            lambda: {i for i, r in killed.items() if r["seq"] <= offset.seq} <= set(_rows(db)),
            10,
            "a line up to the offset is not in the database",
        )

        # The restart publishes what was after the offset, and new finals continue the sequence.
        process = _daemon(_daemon_config(tmp_path, stream_wav, bundle_int8, broker.port, realtime=False))
        assert process.wait(timeout=120) == 0, process.stderr.read()
        rows = _assert_delivered(journal, db)
    finally:
        _stop(collect)
    records = _journal(journal)
    assert len(records) == len(killed) + 3 == len(rows)
    assert [r["seq"] for r in records.values()] == sorted(r["seq"] for r in records.values())
    assert sorted(r["seq"] for r in records.values()) == list(range(1, len(records) + 1))


def test_fleet_of_three_devices_for_a_minute(tmp_path, broker):
    result = run_fleet(tmp_path / "devices", broker.port, devices=3, seconds=60, db=tmp_path / "fleet.sqlite")
    assert not result["lost"] and len(result["sent"]) >= 3 * 8
    assert {i.split(":")[0] for i in result["rows"]} == {"d00", "d01", "d02"}
    for i, r in result["sent"].items():
        assert result["rows"][i][0] == r["text"]
    assert np.percentile(result["latencies"], 50) < 1.0  # seconds from final to database row


# -- TLS, passwords and one-line errors --------------------------------------------------------------------


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_broker(tmp_path):
    """Mosquitto with TLS (a CA made here by openssl signs the broker's and the client's certificates),
    a required client certificate, and a password file."""
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "press-4")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *(["-extfile", "san.ext"] if name == "server" else []),
            cwd=d,
        )
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "press-4", "s3cret pass"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (d / "good.secret").write_text("press-4:s3cret pass\n")
    (d / "bad.secret").write_text("press-4:wrong\n")
    extra = (
        f"cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nrequire_certificate true\n"
        f"password_file {d}/passwd\nallow_anonymous false"
    )
    b = Mosquitto(tmp_path / "broker", extra=extra).start()
    yield b, d
    b.stop(signal.SIGKILL)


def _collect_once(port, db, pki, secret, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_asr",
            "collect",
            "--broker",
            f"127.0.0.1:{port}",
            "--db",
            str(db),
            "--ca-file",
            str(pki / "ca.crt"),
            "--cert-file",
            str(pki / "client.crt"),
            "--key-file",
            str(pki / "client.key"),
            "--credentials",
            str(pki / secret),
            "--duration",
            "3",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tls_with_client_certificate_and_password(tmp_path, tls_broker, capsys):
    from edge_asr.service.broker import BrokerSettings
    from edge_asr.service.publisher import MqttSettings, MqttSink

    broker, pki = tls_broker
    db = tmp_path / "fleet.sqlite"
    out = _collect_once(broker.port, db, pki, "good.secret")  # makes the durable session
    assert out.returncode == 0, out.stderr
    tls = dict(
        tls=True, ca_file=str(pki / "ca.crt"), cert_file=str(pki / "client.crt"), key_file=str(pki / "client.key")
    )

    sink = JsonlSink(tmp_path / "t.jsonl", device_id="press-4")
    mqtt = MqttSink(
        MqttSettings(BrokerSettings("127.0.0.1", broker.port, credentials=str(pki / "good.secret"), **tls), "press-4"),
        sink,
    ).start()
    sink.write(timestamped({"text": "Delivered over TLS.", "start_s": 0.0, "end_s": 1.5}))
    wait_for(lambda: mqtt.status()["backlog_lines"] == 0, 15, f"not acknowledged: {mqtt.status()}")
    sink.close()
    mqtt.close()
    out = _collect_once(broker.port, db, pki, "good.secret")  # the session kept it
    assert out.returncode == 0 and [r[0] for r in _rows(db).values()] == ["Delivered over TLS."]

    # A wrong password: the publisher says so in one line, keeps the line spooled and retries.
    capsys.readouterr()
    sink = JsonlSink(tmp_path / "u.jsonl", device_id="press-4")
    mqtt = MqttSink(
        MqttSettings(
            BrokerSettings("127.0.0.1", broker.port, credentials=str(pki / "bad.secret"), **tls),
            "press-4",
            reconnect_min=0.1,
            reconnect_max=0.3,
        ),
        sink,
    ).start()
    sink.write(timestamped({"text": "Not delivered.", "start_s": 0.0, "end_s": 1.0}))
    wait_for(lambda: mqtt.last_error is not None and mqtt.failures >= 3, 15)
    status = mqtt.status()
    sink.close()
    mqtt.close()
    err = capsys.readouterr().err
    assert status["backlog_lines"] == 1 and "refused" in status["last_error"]
    assert err.count("\n") == 1 and "credentials" in err and "wrong" not in err  # the password never shows

    # collect: the same mistakes end in one line and a non-zero exit.
    cases = {
        "wrong password": _collect_once(broker.port, db, pki, "bad.secret"),
        "unreachable": _collect_once(free_port(), db, pki, "good.secret"),
        "missing CA": _collect_once(broker.port, db, pki, "good.secret", "--ca-file", str(pki / "nope.crt")),
    }
    (pki / "garbage.crt").write_text("not a certificate\n")
    cases["bad CA"] = _collect_once(broker.port, db, pki, "good.secret", "--ca-file", str(pki / "garbage.crt"))
    cases["untrusted"] = _collect_once(broker.port, db, pki, "good.secret", "--ca-file", str(pki / "client.crt"))
    for what, out in cases.items():
        line = out.stderr.strip()
        assert out.returncode == 1 and line.count("\n") == 0 and "Traceback" not in line, (what, out.stderr)
        assert "wrong" not in line and "s3cret" not in line
    assert "refused" in cases["wrong password"].stderr and "unreachable" in cases["unreachable"].stderr
    assert "no such file" in cases["missing CA"].stderr and "cannot load" in cases["bad CA"].stderr
    assert "not trusted" in cases["untrusted"].stderr or "TLS" in cases["untrusted"].stderr


def test_mqtt_config_errors_are_one_line(tmp_path, stream_wav, bundle_int8):
    from edge_asr.service.daemon import load_config

    # what the file says wrongly is input (exit 2); what the daemon cannot do with it, 1
    cases = {
        '[mqtt]\nhost = "127.0.0.1"\nbroker_url = "x"\n': ("broker_url", 2),
        '[output]\njsonl = ""\nstdout = true\n[mqtt]\nhost = "127.0.0.1"\n': ("spool", 1),
        f'[output]\njsonl = "{tmp_path / "o.jsonl"}"\n[mqtt]\nhost = "127.0.0.1"\ntls = true\n'
        f'ca_file = "{tmp_path / "missing.crt"}"\n': ("no such file", 1),
        f'[output]\njsonl = "{tmp_path / "o.jsonl"}"\n[mqtt]\nhost = "127.0.0.1"\nport = "1883"\n': ("integer", 2),
    }
    for text, (expected, code) in cases.items():
        config = tmp_path / "c.toml"
        config.write_text(f'[input]\nsource = "{stream_wav}"\n[model]\nbundle = "{bundle_int8}"\n' + text)
        out = subprocess.run(
            [sys.executable, "-m", "edge_asr", "daemon", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == code and out.stderr.strip().count("\n") == 0 and expected in out.stderr, out.stderr
    with pytest.raises(EdgeAsrError, match="unknown key"):
        config.write_text("[mqtt]\nretain = true\n")
        load_config(config)
