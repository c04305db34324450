"""Connecting to an MQTT broker (paho-mqtt, the `mqtt` extra): settings, TLS, credentials, and one-line
descriptions of every way a connection fails. The publisher (daemon side) and `collect` (plant side) share it.
"""

from __future__ import annotations

import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeAsrError


def log(line: str) -> None:
    """The daemon's and collect's one line about the broker, on standard error."""
    print(f"edge-asr: {line}", file=sys.stderr, flush=True)


@dataclass
class BrokerSettings:
    host: str
    port: int | None = None  # None: 1883, or 8883 with TLS
    tls: bool = False
    ca_file: str | None = None  # None with tls: the system's CAs
    cert_file: str | None = None  # a client certificate, where the broker asks for one
    key_file: str | None = None
    credentials: str | None = None  # a file "username:password" (one line); the password is never logged
    keepalive: int = 60
    connect_timeout: float = 5.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port or (8883 if self.tls else 1883)}"


def topic_prefix(prefix: str, name: str) -> str:
    """The devices' topic prefix without trailing slashes. Empty, or with a wildcard (+ or #, which no
    publisher may use), it is an error; `name` says where it was given."""
    if not prefix.strip("/") or any(c in prefix for c in "+#"):
        raise EdgeAsrError(f"{name} {prefix!r}: the devices' topic prefix, non-empty, without the wildcards + and #")
    return prefix.rstrip("/")


def read_credentials(path: str) -> tuple[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise EdgeAsrError(f"mqtt credentials {path}: cannot read ({e.strerror or e})") from None
    username, sep, password = text.partition(":")
    if not sep or not username or "\n" in text:
        raise EdgeAsrError(f"mqtt credentials {path}: expected one line, username:password")
    return username, password


def make_client(settings: BrokerSettings, client_id: str, clean_session: bool):
    """A paho client with TLS and credentials applied. Bad TLS files or credentials raise EdgeAsrError."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise EdgeAsrError("MQTT needs paho-mqtt: pip install 'edge-asr[mqtt]'") from None
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=mqtt.MQTTv311
    )
    client.suppress_exceptions = False
    client.connect_timeout = settings.connect_timeout
    if settings.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(settings, name)
            if path and not Path(path).is_file():
                raise EdgeAsrError(f"mqtt {name} {path}: no such file")
        if bool(settings.cert_file) != bool(settings.key_file):
            raise EdgeAsrError("mqtt: a client certificate needs both cert_file and key_file")
        try:
            client.tls_set(
                ca_certs=settings.ca_file,
                certfile=settings.cert_file,
                keyfile=settings.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError, ValueError) as e:
            raise EdgeAsrError(f"mqtt TLS files ({_tls_files(settings)}): cannot load ({_ssl_reason(e)})") from None
    elif settings.ca_file or settings.cert_file or settings.key_file:
        raise EdgeAsrError("mqtt: ca_file, cert_file and key_file need tls = true")
    if settings.credentials:
        client.username_pw_set(*read_credentials(settings.credentials))
    return client


def connect(client, settings: BrokerSettings) -> None:
    """Open the connection (TCP and TLS); the broker's answer comes later, to on_connect. Failures raise
    EdgeAsrError with one line."""
    host, port = settings.host, int(settings.address.rsplit(":", 1)[1])
    try:
        client.connect(host, port, keepalive=settings.keepalive)
    except ssl.SSLCertVerificationError as e:
        raise EdgeAsrError(
            f"mqtt broker {settings.address}: TLS certificate not trusted "
            f"({e.verify_message or _ssl_reason(e)}; check ca_file)"
        ) from None
    except ssl.SSLError as e:
        raise EdgeAsrError(f"mqtt broker {settings.address}: TLS handshake failed ({_ssl_reason(e)})") from None
    except socket.gaierror as e:
        raise EdgeAsrError(f"mqtt broker {settings.address}: unknown host ({e.strerror})") from None
    except (socket.timeout, TimeoutError):
        raise EdgeAsrError(f"mqtt broker {settings.address}: no answer within {settings.connect_timeout:g} s") from None
    except OSError as e:
        raise EdgeAsrError(f"mqtt broker {settings.address}: unreachable ({e.strerror or e})") from None


def refusal(settings: BrokerSettings, reason) -> str:
    """The line for a CONNACK that refuses the connection."""
    hint = (
        " (check the credentials file)" if "authori" in str(reason).lower() or "password" in str(reason).lower() else ""
    )
    return f"mqtt broker {settings.address} refused the connection: {reason}{hint}"


def connection_lost(settings: BrokerSettings, reason) -> str:
    """The line for a connection that dropped. paho reports a socket closed under it as "Unspecified error"."""
    why = str(reason)
    why = "closed by the broker or the network" if why in ("Unspecified error", "") else why
    return f"mqtt broker {settings.address}: connection lost ({why})"


def _tls_files(settings: BrokerSettings) -> str:
    return ", ".join(
        f"{n}={getattr(settings, n)}" for n in ("ca_file", "cert_file", "key_file") if getattr(settings, n)
    )


def _ssl_reason(e: Exception) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
