"""A real MQTT broker for the tests (amqtt), in a process of its own so that a test can
kill it and start it again; it appends every message it takes to a file, so a test
knows exactly what reached the broker (a subscriber could miss messages around a
restart, which would test the subscriber, not us).

    python tests/mqtt_broker.py PORT RECORD_FILE [CERT_FILE KEY_FILE]

With a certificate and its key, it listens with TLS (mqtts://).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin


class Recorder(BasePlugin):  # type: ignore[type-arg]
    """Appends each message the broker receives: topic and payload, one JSON line."""

    async def on_broker_message_received(self, *, client_id: str, message: Any) -> None:
        with open(sys.argv[2], "a") as record:
            record.write(json.dumps({"topic": message.topic, "data": message.data.decode()}))
            record.write("\n")


async def main(port: int) -> None:
    listener: dict[str, Any] = {"type": "tcp", "bind": f"127.0.0.1:{port}"}
    if len(sys.argv) > 4:
        listener.update(ssl=True, certfile=sys.argv[3], keyfile=sys.argv[4])
    config = {
        "listeners": {"default": listener},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            "mqtt_broker.Recorder": {},
        },
    }
    broker = Broker(config)
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
