"""Where decisions go on the line: MQTT brokers and webhooks, one per ``--publish URL``.

``mqtt://[user@]host[:port]/topic`` and ``mqtts://`` publish each message at QoS 1 with
paho-mqtt (the broker confirms every one); the topic may hold ``{model}`` and
``{kind}``. ``http(s)://`` POSTs each message's JSON to a webhook with httpx; with a key
file, the header ``X-Cflowad-Signature: sha256=<hex>`` is the HMAC-SHA256 of the body.
Passwords, keys and TLS files are read from files named by options, never taken from
the command line (where ``ps`` and shell histories show them).

A destination only delivers: what to send, ids, order and retries are
:mod:`cflowad.line.publish`'s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit
from uuid import uuid4

from cflowad.common.errors import UserError, missing_extra

__all__ = [
    "Delivery",
    "Destination",
    "MqttDestination",
    "PublishSettings",
    "WebhookDestination",
    "open_destination",
]

SIGNATURE_HEADER = "X-Cflowad-Signature"
ID_HEADER = "X-Cflowad-Id"
WHAT = ("all", "anomalous", "events")
# a webhook's answer that refuses this message for good (retrying cannot help);
# anything else that is not 2xx (401, 404, 429, 5xx, no answer) is retried
_REFUSED = {400, 413, 415, 422}
_CONFIRM_SECONDS = 10.0  # a broker's confirmations of one batch, or a webhook's answer


@dataclass(frozen=True)
class PublishSettings:
    """``--publish`` and its options: one source for serve, watch, stream and the studio."""

    urls: tuple[str, ...] = ()
    what: str = "anomalous"  # all | anomalous (anomalous decisions and events) | events
    password_file: Path | None = None
    hmac_key_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # a client certificate: PEM with its key
    spool_max_mb: float = 512.0

    def __post_init__(self) -> None:
        if self.what not in WHAT:
            raise UserError(f"option --publish-what={self.what!r}: choose {', '.join(WHAT)}")
        if self.spool_max_mb <= 0:
            raise UserError(f"option --spool-max-mb={self.spool_max_mb} must be positive")
        for url in self.urls:
            parse_url(url)
        for option, path in (
            ("--publish-password-file", self.password_file),
            ("--publish-hmac-key-file", self.hmac_key_file),
            ("--publish-ca-file", self.ca_file),
            ("--publish-cert-file", self.cert_file),
        ):
            if path is not None and not path.is_file():
                raise UserError(f"option {option}={path}: file not found")

    def secret(self, path: Path | None) -> str | None:
        """A password or key file's text, without its trailing newline."""
        return None if path is None else path.read_text().rstrip("\r\n")


@dataclass(frozen=True)
class Delivery:
    """What one attempt did: how many messages from the start are settled (delivered,
    or refused for good), how many of those were refused, and why it stopped early."""

    settled: int
    refused: int = 0
    error: str | None = None
    retry_after: float | None = None


class Destination(Protocol):
    """A broker or a receiver; ``deliver`` never raises, it says what it did."""

    name: str  # the URL without secrets, for logs and metrics

    def deliver(self, messages: list[bytes]) -> Delivery: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Url:
    scheme: str
    user: str | None
    host: str
    port: int
    path: str  # topic (MQTT) or path and query (HTTP)


def parse_url(url: str) -> _Url:
    """Check one ``--publish`` URL; a one-line error names what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UserError(f"option --publish={url!r}: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts", "http", "https"):
        raise UserError(
            f"option --publish={url!r}: use mqtt://host/topic, mqtts://, http:// or https://"
        )
    if parts.password is not None:
        raise UserError(
            f"option --publish: {scheme}://{parts.username}:***@...: a password in the URL "
            "is visible to anyone on the machine; put it in --publish-password-file"
        )
    if not parts.hostname:
        raise UserError(f"option --publish={url!r}: no host")
    if scheme.startswith("mqtt"):
        topic = parts.path.lstrip("/")
        if not topic or "#" in url or "+" in topic:
            raise UserError(
                f"option --publish={url!r}: give a topic without wildcards, e.g. "
                "mqtt://broker/factory/line1/{model}"
            )
        path = topic
    else:
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
    default = {"mqtt": 1883, "mqtts": 8883, "http": 80, "https": 443}[scheme]
    return _Url(scheme, parts.username, parts.hostname, port or default, path)


def open_destination(url: str, settings: PublishSettings) -> Destination:
    """The destination for one ``--publish`` URL."""
    parsed = parse_url(url)
    if parsed.scheme.startswith("mqtt"):
        return MqttDestination(url, parsed, settings)
    return WebhookDestination(url, parsed, settings)


class MqttDestination:
    """A broker, through paho-mqtt at QoS 1 (PUBACK per message), reconnecting by itself.

    Messages are published only while connected: paho would otherwise queue them in
    memory, outside the spool's bound.
    """

    def __init__(self, url: str, parsed: _Url, settings: PublishSettings) -> None:
        try:
            from paho.mqtt.client import Client
            from paho.mqtt.enums import CallbackAPIVersion
        except ImportError:
            raise missing_extra("--publish mqtt://", "paho-mqtt", "stream") from None
        self.name, self.topic = url, parsed.path  # a URL holds no secret: refused above
        self._failure: str | None = None
        # unique per connection: a broker disconnects the older of two equal ids
        identity = f"cflowad-{uuid4().hex[:12]}"
        client = Client(CallbackAPIVersion.VERSION2, client_id=identity)
        if parsed.user is not None:
            client.username_pw_set(parsed.user, settings.secret(settings.password_file))
        if parsed.scheme == "mqtts":
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = lambda *_: self._fail("cannot connect")
        client.on_disconnect = self._on_disconnect
        client.connect_async(parsed.host, parsed.port, keepalive=30)
        client.loop_start()
        self._client = client

    def deliver(self, messages: list[bytes]) -> Delivery:
        if not self._client.is_connected():
            return Delivery(0, error=f"broker not connected ({self._failure or 'connecting'})")
        sent = []
        for message in messages:
            topic = _topic(self.topic, message)
            info = self._client.publish(topic, message, qos=1)
            if info.rc != 0:
                break
            sent.append(info)
        settled, deadline = 0, time.monotonic() + _CONFIRM_SECONDS
        for info in sent:  # confirmed in order: a message counts once the broker has it
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                break
            if not info.is_published():
                break
            settled += 1
        if settled < len(messages):
            return Delivery(settled, error="broker did not confirm (disconnected?)")
        return Delivery(settled)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, code: Any, props: Any) -> None:
        self._failure = None if not code.is_failure else str(code)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, code: Any, props: Any) -> None:
        self._fail(f"disconnected: {code}")

    def _fail(self, why: str) -> None:
        self._failure = why


def _topic(pattern: str, message: bytes) -> str:
    if "{" not in pattern:
        return pattern
    fields = json.loads(message)
    return re.sub(
        r"\{(model|kind)\}",
        lambda m: re.sub(r"[#+/]", "_", str(fields.get(m.group(1), ""))),
        pattern,
    )


class WebhookDestination:
    """A receiver over HTTP(S): one POST of JSON per message, signed when a key is given."""

    def __init__(self, url: str, parsed: _Url, settings: PublishSettings) -> None:
        try:
            import httpx
        except ImportError:
            raise missing_extra("--publish http://", "httpx", "stream") from None
        self.name = self.url = url
        key = settings.secret(settings.hmac_key_file)
        self._key = key.encode() if key else None
        auth = (
            (parsed.user, settings.secret(settings.password_file) or "")
            if parsed.user is not None
            else None
        )
        self._http = httpx.Client(
            timeout=httpx.Timeout(_CONFIRM_SECONDS),
            auth=auth,
            verify=str(settings.ca_file) if settings.ca_file else True,
            cert=str(settings.cert_file) if settings.cert_file else None,
        )
        self._errors = (httpx.HTTPError,)

    def deliver(self, messages: list[bytes]) -> Delivery:
        refused = 0
        for done, message in enumerate(messages):
            headers = {"Content-Type": "application/json", ID_HEADER: json.loads(message)["id"]}
            if self._key is not None:
                digest = hmac.new(self._key, message, hashlib.sha256).hexdigest()
                headers[SIGNATURE_HEADER] = f"sha256={digest}"
            try:
                answer = self._http.post(self.url, content=message, headers=headers)
            except self._errors as error:
                return Delivery(done, refused, f"{type(error).__name__}: {error}")
            if answer.status_code in _REFUSED:
                refused += 1
                continue
            if not answer.is_success:
                return Delivery(
                    done,
                    refused,
                    f"HTTP {answer.status_code}",
                    _retry_after(answer.headers.get("retry-after")),
                )
        return Delivery(len(messages), refused)

    def close(self) -> None:
        self._http.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the usual backoff
