"""--publish: the spool on disk, a real MQTT broker (amqtt), a webhook receiver in-process,
destinations down then up, and kill -9 of a watch with messages still spooled."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cflowad.common.errors import UserError
from cflowad.line.publish import Publisher
from cflowad.line.sinks import PublishSettings
from cflowad.line.spool import Spool

HERE = Path(__file__).parent


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the spool


def test_spool_keeps_order_across_a_reopen_and_cuts_a_torn_line(tmp_path):
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.append([b'{"n": %d}' % i for i in range(5)])
    batch = spool.peek(3)
    assert [line for line, _ in batch] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    spool.ack(batch[1][1], 2)  # two delivered
    with next(tmp_path.glob("*.jsonl")).open("ab") as segment:
        segment.write(b'{"n": 5')  # a kill in the middle of an append
    reopened = Spool(tmp_path, max_bytes=2**20)  # a new process
    assert reopened.pending == 3
    assert [line for line, _ in reopened.peek(10)] == [b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']
    reopened.append([b'{"n": 6}'])
    assert [json.loads(line)["n"] for line, _ in reopened.peek(10)] == [2, 3, 4, 6]


def test_spool_drops_the_oldest_past_its_bound_and_counts_them(tmp_path):
    spool = Spool(tmp_path, max_bytes=256 * 1024)  # segments of 64 KiB
    payload = b"x" * 1000
    dropped = sum(spool.append([b'{"n": %d, "p": "%s"}' % (i, payload)]) for i in range(600))
    assert spool.size <= 256 * 1024 + 64 * 1024
    left = [json.loads(line)["n"] for line, _ in spool.peek(1000)]
    assert dropped > 0 and dropped + len(left) == 600 == dropped + spool.pending
    assert left == list(range(600 - len(left), 600))  # the newest, in order, none twice


def test_spool_removes_delivered_segments(tmp_path):
    spool = Spool(tmp_path, max_bytes=2**20)  # segments of 128 KiB
    for i in range(300):
        spool.append([b'{"n": %d, "p": "%s"}' % (i, b"y" * 1000)])
    assert len(list(tmp_path.glob("*.jsonl"))) >= 3
    while batch := spool.peek(50):
        spool.ack(batch[-1][1], len(batch))
    assert spool.pending == 0 and len(list(tmp_path.glob("*.jsonl"))) == 1


def _publish_numbers(publisher: Publisher, numbers: range, anomalous: bool = True) -> None:
    for n in numbers:
        publisher.publish(
            "result",
            {"n": n, "anomalous": anomalous},
            model="m",
            version="v1",
            subject=f"image {n}",
            at="2026-12-03T00:00:00",
        )


@pytest.mark.slow  # a broker or receiver through outages
def test_webhook_down_failing_then_recovering_gets_everything_once_in_order_signed(
    tmp_path, webhook, free_port
):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    settings = PublishSettings(urls=(url,), what="all", hmac_key_file=key)
    publisher = Publisher(settings, tmp_path / "spool", "watch", lambda line: None)
    started = time.monotonic()
    _publish_numbers(publisher, range(10))  # nobody listens yet
    assert time.monotonic() - started < 2  # scoring never waits for the receiver
    time.sleep(0.5)
    receiver = webhook(port, fail=[503, 500, 503])  # up, failing, then recovering
    _publish_numbers(publisher, range(10, 20))
    _wait_for(lambda: len(receiver.received) >= 20)
    publisher.close()
    messages = receiver.messages()
    assert [m["n"] for m in messages] == list(range(20))
    assert len({m["id"] for m in messages}) == 20
    for headers, body in receiver.received:  # the signature, checked independently
        digest = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["X-Cflowad-Signature"] == f"sha256={digest}"
        assert headers["X-Cflowad-Id"] == json.loads(body)["id"]
    (stats,) = publisher.stats()
    assert stats["published"] == 20 and stats["retried"] > 0 and stats["pending"] == 0


def test_publish_what_filters_and_a_refused_message_is_skipped(tmp_path, webhook):
    receiver = webhook(fail=[422])  # the first message is refused for good
    url = f"http://127.0.0.1:{receiver.port}/"
    publisher = Publisher(PublishSettings(urls=(url,)), tmp_path / "spool", "serve", print)
    _publish_numbers(publisher, range(0, 3), anomalous=True)
    _publish_numbers(publisher, range(3, 6), anomalous=False)  # not sent: normal decisions
    publisher.publish("drift", {"state": "tripped"}, model="m", version="v", subject="d", at="t")
    _wait_for(lambda: len(receiver.received) >= 3)
    publisher.close()
    assert [m.get("n", m["kind"]) for m in receiver.messages()] == [1, 2, "drift"]
    (stats,) = publisher.stats()
    assert stats["refused"] == 1 and stats["published"] == 3


def test_bad_publish_options_are_one_line_errors(tmp_path):
    for url, words in [
        ("ftp://host/x", "use mqtt://"),
        ("mqtt://host", "topic"),
        ("mqtt://host/a/#", "wildcards"),
        ("mqtt://me:pw@host/a", "--publish-password-file"),
    ]:
        with pytest.raises(UserError, match=words):
            PublishSettings(urls=(url,))
    with pytest.raises(UserError, match="--publish-what"):
        PublishSettings(what="some")
    with pytest.raises(UserError, match="--publish-hmac-key-file"):
        PublishSettings(hmac_key_file=tmp_path / "missing")


# -- a real MQTT broker


class _Broker:
    """amqtt in its own process (tests/mqtt_broker.py): kill it, start it again."""

    def __init__(self, tmp_path: Path, port: int, tls: tuple[Path, Path] | None = None) -> None:
        self.port, self.record = port, tmp_path / "broker.jsonl"
        self.tls = [str(path) for path in tls or ()]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        script = str(HERE / "mqtt_broker.py")
        self.process = subprocess.Popen(
            [sys.executable, script, str(self.port), str(self.record), *self.tls],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def messages(self) -> list[tuple[str, dict]]:
        if not self.record.is_file():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [(line["topic"], json.loads(line["data"])) for line in lines]


@pytest.fixture
def broker(tmp_path, free_port):
    broker = _Broker(tmp_path, free_port())
    broker.start()
    yield broker
    broker.kill()


@pytest.mark.slow  # a broker or receiver through outages
def test_mqtt_broker_down_then_up_loses_nothing_and_keeps_order(broker, tmp_path):
    url = f"mqtt://127.0.0.1:{broker.port}/factory/line1/{{model}}/{{kind}}"
    publisher = Publisher(PublishSettings(urls=(url,)), tmp_path / "spool", "stream", print)
    _publish_numbers(publisher, range(10))
    _wait_for(lambda: publisher.stats()[0]["published"] == 10)
    broker.kill()
    started = time.monotonic()
    _publish_numbers(publisher, range(10, 25))  # the broker is gone
    assert time.monotonic() - started < 2  # never blocks scoring
    time.sleep(1)
    assert publisher.stats()[0]["pending"] == 15
    broker.start()
    _wait_for(lambda: publisher.stats()[0]["pending"] == 0, 60)
    publisher.close()
    received = broker.messages()
    assert {topic for topic, _ in received} == {"factory/line1/m/result"}
    numbers = [m["n"] for _, m in received]
    assert sorted(set(numbers)) == list(range(25))  # every one arrived
    first = {n: numbers.index(n) for n in set(numbers)}
    assert sorted(first, key=first.get) == list(range(25))  # in order
    by_id: dict[str, int] = {}
    for _, message in received:  # a repeat, if any, carries its first id
        assert by_id.setdefault(message["id"], message["n"]) == message["n"]
    assert publisher.stats()[0]["published"] >= 25


@pytest.mark.slow  # a broker or receiver through outages
def test_kill_9_of_watch_with_a_pending_spool_loses_nothing(tmp_path, webhook, free_port):
    """The receiver is down while watch scores; watch is killed; every image scored
    (in the journal) reaches the receiver once it is up and watch runs again."""
    from cflowad.line.watch import watch_folder

    sys.path.insert(0, str(HERE))  # the subprocess imports it the same way
    from test_streams import _Brightest, _png  # the closed-form model and images

    inbox, out, port = tmp_path / "inbox", tmp_path / "out", free_port()
    inbox.mkdir()
    for i in range(24):
        (inbox / f"{i:02d}.png").write_bytes(_png(inbox, value=40 + i))
    url = f"http://127.0.0.1:{port}/hook"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from pathlib import Path
        from test_streams import _Brightest
        from cflowad.line.publish import Publisher
        from cflowad.line.sinks import PublishSettings
        from cflowad.line.watch import watch_folder
        out = Path({str(out)!r})
        publisher = Publisher(PublishSettings(urls=({url!r},), what="all"), out / "spool",
                              "watch", print)
        watch_folder(_Brightest(delay=0.1), Path({str(inbox)!r}), out, settle=0.1,
                     batch_size=2, once=True, publisher=publisher, model_name="brick")
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    journal = out / "results.jsonl"

    def six_scored() -> bool:
        assert process.poll() is None, "watch ended early"
        return journal.is_file() and len(journal.read_text().splitlines()) >= 6

    _wait_for(six_scored, 120)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    scored = len(journal.read_text().splitlines())
    assert 6 <= scored < 24
    receiver = webhook(port)
    publisher = Publisher(
        PublishSettings(urls=(url,), what="all"), out / "spool", "watch", lambda line: None
    )
    watch_folder(
        _Brightest(), inbox, out, settle=0.1, once=True, publisher=publisher, model_name="brick"
    )
    assert publisher.close() == 0
    messages = receiver.messages()
    files = [json.loads(line)["file"] for line in journal.read_text().splitlines()]
    assert sorted(files) == [f"{i:02d}.png" for i in range(24)]
    assert {m["file"] for m in messages} == set(files)  # every scored image delivered
    ids: dict[str, str] = {}
    for message in messages:  # duplicates only by id: one file, one id
        assert ids.setdefault(message["file"], message["id"]) == message["id"]
    assert {m["model"] for m in messages} == {"brick"}


@pytest.mark.slow  # a broker or receiver through outages
def test_stream_publishes_anomalous_frames_and_events_to_mqtt(broker, tmp_path):
    sys.path.insert(0, str(HERE))
    from test_streams import DEFECTS, _Brightest, _frame, _video

    from cflowad.line.stream import stream_video

    frames = [_frame(i, (20, 40) if i in DEFECTS else None) for i in range(30)]
    video = _video(tmp_path / "line.mp4", frames)
    url = f"mqtt://127.0.0.1:{broker.port}/line1/{{kind}}"
    publisher = Publisher(PublishSettings(urls=(url,)), tmp_path / "out" / "spool", "stream", print)
    stream_video(
        _Brightest(), str(video), tmp_path / "out", debounce=2, publisher=publisher, model_name="m"
    )
    assert publisher.close() == 0
    received = broker.messages()
    frames_sent = [m["frame"] for topic, m in received if topic == "line1/result"]
    events = [(m["first_frame"], m["last_frame"]) for t, m in received if t == "line1/event"]
    assert frames_sent == sorted(DEFECTS)  # --publish-what anomalous: only those, in order
    assert events == [(5, 7), (22, 25)]
    assert {m["source"] for _, m in received} == {str(video)}


def test_watch_command_publishes_to_a_webhook(trained_model, texture_dataset, tmp_path, webhook):
    from cflowad.cli import main

    model = tmp_path / "brick"
    trained_model.save(model)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images = sorted((texture_dataset / "test").glob("*/*.png"))
    for image in images:
        (inbox / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    receiver = webhook()
    url = f"http://127.0.0.1:{receiver.port}/hook"
    out = tmp_path / "out"
    command = ["watch", str(model), str(inbox), "--out", str(out), "--once", "--settle", "0.1"]
    assert main([*command, "--publish", url, "--publish-what", "all", "-q"]) == 0
    journal = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    messages = receiver.messages()
    assert [(m["file"], m["score"]) for m in messages] == [(r["file"], r["score"]) for r in journal]
    assert {m["model"] for m in messages} == {"brick"} and len(messages) == len(images)
    assert main([*command, "--publish", "mqtt://host", "-q"]) == 2  # a one-line error


@pytest.mark.slow  # a broker or receiver through outages
def test_mqtts_with_a_ca_file_delivers_and_an_unknown_ca_does_not(tmp_path, free_port):
    """TLS to the broker: the certificate is checked against --publish-ca-file."""
    import trustme

    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    server.cert_chain_pems[0].write_to_path(cert)
    server.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    stranger.cert_pem.write_to_path(tmp_path / "stranger.pem")
    broker = _Broker(tmp_path, free_port(), tls=(cert, key))
    broker.start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}/secure"
        warnings: list[str] = []
        trusted = Publisher(
            PublishSettings(urls=(url,), ca_file=tmp_path / "ca.pem"),
            tmp_path / "a",
            "watch",
            warnings.append,
        )
        untrusted = Publisher(
            PublishSettings(urls=(url,), ca_file=tmp_path / "stranger.pem"),
            tmp_path / "b",
            "watch",
            warnings.append,
        )
        _publish_numbers(trusted, range(3))
        _publish_numbers(untrusted, range(100, 103))
        _wait_for(lambda: trusted.stats()[0]["published"] == 3)
        time.sleep(2)
        assert untrusted.stats()[0]["published"] == 0 and untrusted.stats()[0]["pending"] == 3
        assert trusted.close() == 0 and untrusted.close(0) == 3  # kept for a fixed CA
    finally:
        broker.kill()
    assert [m["n"] for _, m in broker.messages()] == [0, 1, 2]
    assert any("cannot deliver" in w for w in warnings)
