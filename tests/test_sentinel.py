"""Redis Sentinel: the settings, a client that finds the master through the sentinels,
and acknowledgements that wait for replicas (WAIT), against a real master, replica and
three sentinels. The failover scenarios are in tests/faults/test_sentinel_faults.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from redis import Redis

from app import create_app, status
from app.config import check, from_environ
from app.errors import ConfigError, QueueUnavailableError
from app.mail import Attachment, idempotency, send_email, send_many
from app.queues import connect_app, get_redis, min_replicas
from tests.conftest import API_TOKEN, run_worker
from tests.sentinels import SentinelCluster
from tests.servers import SMTPServer

SENTINEL_PASSWORD = "sentinel-secret"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", []),
        ("10.0.0.1:26379", [("10.0.0.1", 26379)]),
        ("a:1, b:2 ,c", [("a", 1), ("b", 2), ("c", 26379)]),
        ("[::1]:26380", [("::1", 26380)]),
    ],
)
def test_sentinels_are_parsed(raw: str, expected: list[tuple[str, int]]) -> None:
    assert from_environ({"REDIS_SENTINELS": raw})["REDIS_SENTINELS"] == expected


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("REDIS_SENTINELS", "host:port"),
        ("REDIS_SENTINELS", "a:1,b:99999"),
        ("REDIS_SENTINELS", "user@a:1"),
        ("REDIS_SENTINELS", "a:1/0"),
        ("REDIS_SENTINEL_MASTER", "my master"),
        ("REDIS_SENTINEL_MASTER", " "),
        ("REDIS_MIN_REPLICAS", "one"),
        ("REDIS_MIN_REPLICAS", "-1"),
    ],
)
def test_a_malformed_value_names_its_key(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_environ({key: raw})


def test_a_unix_socket_url_cannot_go_through_sentinels() -> None:
    config = from_environ({"REDIS_SENTINELS": "a:1", "REDIS_URL": "unix:///run/redis.sock"})
    with pytest.raises(ConfigError, match="REDIS_URL"):
        check(config)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 0),
        ({"REDIS_SENTINELS": "a:1"}, 1),
        ({"REDIS_SENTINELS": "a:1", "REDIS_MIN_REPLICAS": "0"}, 0),
        ({"REDIS_MIN_REPLICAS": "2"}, 2),
    ],
)
def test_min_replicas_defaults_to_one_under_sentinel(
    environ: dict[str, str], expected: int
) -> None:
    assert min_replicas(from_environ(environ)) == expected


def test_rediss_url_gives_tls_and_credentials_to_the_master_pool() -> None:
    config = from_environ(
        {"REDIS_SENTINELS": "a:1", "REDIS_URL": "rediss://user:pw@ignored.example:6380/3"}
    )
    client = connect_app(config)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "user", "pw")
    assert "host" not in kwargs
    assert client.connection_pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    client.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[SentinelCluster]:
    started = SentinelCluster(sentinel_password=SENTINEL_PASSWORD).start()
    yield started
    started.cleanup()


@pytest.fixture
def sentinel_env(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    cluster: SentinelCluster,
    smtp_server: SMTPServer,
) -> dict[str, str]:
    """`env`, with the Redis of the cluster reached through its sentinels."""
    with Redis(port=cluster.master.port) as master:
        master.flushall()
    values = {
        "REDIS_URL": cluster.url,
        "REDIS_SENTINELS": cluster.setting,
        "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**env, **values}


@pytest.fixture
def sentinel_app(sentinel_env: dict[str, str]) -> Flask:
    return create_app({"TESTING": True})


def test_mail_goes_through_the_master_the_sentinels_name(
    sentinel_app: Flask, cluster: SentinelCluster, smtp_server: SMTPServer
) -> None:
    with sentinel_app.app_context():
        mail_id = send_email("ann@example.com", "Hello", "test", address="Ann").id
        assert get_redis().connection_pool.get_master_address() == (
            "127.0.0.1",
            cluster.master.port,
        )
    # Accepted means replicated: the replica has the record when send_email returns.
    with Redis(port=cluster.replica.port) as replica:
        record = status.load(replica, mail_id)
    assert record is not None and record.status == status.QUEUED
    run_worker()
    assert [m.message_id for m in smtp_server.wait_for(1)] == [f"<{mail_id}@example.com>"]
    with Redis(port=cluster.replica.port) as replica:
        sent = status.load(replica, mail_id)
    assert sent is not None and sent.status == status.SENT


def test_too_few_replicas_refuse_the_mail(
    monkeypatch: pytest.MonkeyPatch, sentinel_env: dict[str, str]
) -> None:
    """One replica, two asked for: WAIT times out, and nothing is called accepted."""
    monkeypatch.setenv("REDIS_MIN_REPLICAS", "2")
    app = create_app({"TESTING": True})
    with app.app_context(), pytest.raises(QueueUnavailableError, match="1 of 2 replicas"):
        send_email("ann@example.com", "Hello", "test", address="Ann")
    with app.app_context(), pytest.raises(QueueUnavailableError, match="1 of 2 replicas"):
        send_many([{"to": "bob@example.com", "subject": "Hi", "template": "test"}])
    response = app.test_client().post(
        "/api/mail",
        json={"to": "ann@example.com", "subject": "Hello", "template": "test"},
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    assert response.status_code == 503
    # An idempotency key WATCHes first (its pipeline holds a connection): WAIT all the same.
    with app.app_context(), pytest.raises(QueueUnavailableError, match="1 of 2 replicas"):
        send_email("ann@example.com", "Hello", "test", address="Ann", idempotency_key="k")


def test_attachments_and_idempotency_keys_are_on_the_replica_when_accepted(
    sentinel_app: Flask, cluster: SentinelCluster
) -> None:
    with sentinel_app.app_context():
        job = send_email(
            "ann@example.com",
            "Invoice",
            "test",
            address="Ann",
            attachments=[Attachment("a.pdf", b"%PDF-1.4 tiny")],
            idempotency_key="order-42",
        )
    with Redis(port=cluster.replica.port) as replica:
        assert replica.get(status.attachments_key(job.id)) == b"%PDF-1.4 tiny"
        assert replica.exists(idempotency.key("order-42")) == 1


def test_without_replicas_asked_for_no_wait_is_sent(
    monkeypatch: pytest.MonkeyPatch, sentinel_env: dict[str, str], cluster: SentinelCluster
) -> None:
    monkeypatch.setenv("REDIS_MIN_REPLICAS", "0")
    app = create_app({"TESTING": True})
    with Redis(port=cluster.master.port) as master:
        before = int(master.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        with app.app_context():
            send_email("ann@example.com", "Hello", "test", address="Ann")
        after = int(master.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    assert after == before
