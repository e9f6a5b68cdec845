"""Provider webhooks, each with correctly signed, wrongly signed, stale and replayed
requests: real HMAC (Mailgun), real ECDSA P-256 keys (SendGrid), real X.509
certificates and RSA signatures made here (SES through SNS), real Basic credentials
(Postmark). A refused request writes nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import create_app, digests, maillog, status, suppression
from app.errors import ConfigError
from app.mail import send_email
from app.webhooks import ses
from tests.servers import SMTPServer

MAILGUN_KEY = "key-mailgun-test-0123456789"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-bounces"
CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem"


def snapshot(redis_client: Redis) -> dict[bytes, bytes | None]:
    return {key: redis_client.dump(key) for key in redis_client.scan_iter(count=1000)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No certificate is ever fetched here: each test's own goes in through the seam."""

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise OSError("tests fetch nothing: use ses.trust_certificate")

    monkeypatch.setattr("urllib.request.urlopen", offline)


@pytest.fixture(scope="module")
def sendgrid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def sns_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: rsa.RSAPrivateKey, *, days: int = 1, start: int = -1) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=start))
        .not_valid_after(now + timedelta(days=start + days + 1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def hooks(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, sendgrid_key: ec.EllipticCurvePrivateKey
) -> Flask:
    public = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    monkeypatch.setenv("MAILGUN_WEBHOOK_SIGNING_KEY", MAILGUN_KEY)
    monkeypatch.setenv("SENDGRID_WEBHOOK_PUBLIC_KEY", base64.b64encode(public).decode())
    monkeypatch.setenv("SES_SNS_TOPIC_ARNS", f"{TOPIC}, arn:aws:sns:us-east-1:123456789012:other")
    monkeypatch.setenv("POSTMARK_WEBHOOK_USER", "postmark")
    monkeypatch.setenv("POSTMARK_WEBHOOK_PASSWORD", "pm-secret")
    return create_app({"TESTING": True})


@pytest.fixture
def hook_client(hooks: Flask) -> FlaskClient:
    return hooks.test_client()


@pytest.fixture
def our_mail(hooks: Flask) -> Iterator[tuple[str, str]]:
    """A mail of ours: its id and its Message-ID."""
    with hooks.app_context():
        job = send_email("ann@example.com", "Hello", "test", address="x")
    yield job.id, f"<{job.id}@example.com>"


def entry(redis_client: Redis, address: str) -> suppression.Entry | None:
    return suppression.get(redis_client, address)


def test_no_secret_no_route(client: FlaskClient) -> None:
    for provider in ("mailgun", "sendgrid", "ses", "postmark"):
        assert client.post(f"/webhooks/{provider}", json={}).status_code == 404


# -- Mailgun ------------------------------------------------------------------------------


def mailgun_body(event: dict[str, Any], *, key: str = MAILGUN_KEY, at: float | None = None,
                 token: str | None = None) -> dict[str, Any]:  # fmt: skip
    timestamp = str(int(at if at is not None else time.time()))
    token = token or hashlib.sha256(str(time.perf_counter_ns()).encode()).hexdigest()[:50]
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": event,
    }


def mailgun_failed(message_id: str = "x@y", severity: str = "permanent") -> dict[str, Any]:
    return {
        "event": "failed", "severity": severity, "recipient": "Ann@Example.com",
        "reason": "bounce", "message": {"headers": {"message-id": message_id.strip("<>")}},
        "delivery-status": {"code": 550, "message": "5.1.1 The email account does not exist"},
    }  # fmt: skip


def test_mailgun_permanent_failure_suppresses_and_marks_our_mail(
    hook_client: FlaskClient, redis_client: Redis, our_mail: tuple[str, str], hooks: Flask,
    auth: dict[str, str],
) -> None:  # fmt: skip
    mail_id, message_id = our_mail
    response = hook_client.post("/webhooks/mailgun", json=mailgun_body(mailgun_failed(message_id)))
    assert response.status_code == 200 and response.get_json()["suppressed"] == 1
    found = entry(redis_client, "ann@example.com")
    assert found is not None and (found.reason, found.source) == ("hard_bounce", "mailgun")
    assert "does not exist" in found.detail
    view = hook_client.get(f"/api/mail/{mail_id}", headers=auth).get_json()
    assert view["events"][0] | {"at": ""} == {
        "event": "bounced", "at": "", "recipient": "ann@example.com", "source": "mailgun",
        "detail": found.detail,
    }  # fmt: skip


def test_mailgun_complaint_and_ignored_events(
    hook_client: FlaskClient, redis_client: Redis
) -> None:
    body = mailgun_body({"event": "complained", "recipient": "bob@example.com"})
    assert hook_client.post("/webhooks/mailgun", json=body).status_code == 200
    assert entry(redis_client, "bob@example.com").reason == "complaint"  # type: ignore[union-attr]
    temporary = mailgun_body(mailgun_failed(severity="temporary"))
    assert hook_client.post("/webhooks/mailgun", json=temporary).get_json()["suppressed"] == 0
    assert entry(redis_client, "ann@example.com") is None


@pytest.mark.parametrize(
    ("make", "status_code"),
    [
        (lambda: mailgun_body(mailgun_failed(), key="wrong-key"), 401),
        (lambda: mailgun_body(mailgun_failed(), at=time.time() - 301), 401),
        (lambda: mailgun_body(mailgun_failed(), at=time.time() + 301), 401),
        (lambda: {"event-data": mailgun_failed()}, 401),
        (lambda: {**mailgun_body(mailgun_failed()), "event-data": "x"}, 400),
    ],
    ids=["wrong key", "stale", "from the future", "unsigned", "signed nonsense"],
)
def test_mailgun_refuses_and_writes_nothing(
    hook_client: FlaskClient, redis_client: Redis, make: Callable[[], Any], status_code: int
) -> None:
    before = snapshot(redis_client)
    assert hook_client.post("/webhooks/mailgun", json=make()).status_code == status_code
    assert snapshot(redis_client) == before


def test_mailgun_replay_is_refused(hook_client: FlaskClient, redis_client: Redis) -> None:
    body = mailgun_body(mailgun_failed())
    assert hook_client.post("/webhooks/mailgun", json=body).status_code == 200
    suppression.remove(redis_client, "ann@example.com")
    before = snapshot(redis_client)
    assert hook_client.post("/webhooks/mailgun", json=body).status_code == 409
    assert snapshot(redis_client) == before
    tampered = json.loads(json.dumps(body))
    tampered["signature"]["token"] = "another-token"
    assert hook_client.post("/webhooks/mailgun", json=tampered).status_code == 401


# -- SendGrid -----------------------------------------------------------------------------


def sendgrid_post(
    client: FlaskClient, key: ec.EllipticCurvePrivateKey, events: Any, *,
    at: float | None = None, raw: bytes | None = None, sign_body: bytes | None = None,
) -> Any:  # fmt: skip
    body = raw if raw is not None else json.dumps(events).encode()
    timestamp = str(int(at if at is not None else time.time()))
    signed = timestamp.encode() + (sign_body if sign_body is not None else body)
    signature = base64.b64encode(key.sign(signed, ec.ECDSA(hashes.SHA256()))).decode()
    headers = {
        "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }
    return client.post(
        "/webhooks/sendgrid", data=body, headers=headers, content_type="application/json"
    )


def test_sendgrid_bounce_and_spamreport(
    hook_client: FlaskClient, redis_client: Redis, sendgrid_key: ec.EllipticCurvePrivateKey,
    our_mail: tuple[str, str],
) -> None:  # fmt: skip
    mail_id, message_id = our_mail
    events = [
        {"email": "ann@example.com", "event": "bounce", "type": "bounce", "status": "5.1.1",
         "reason": "550 5.1.1 unknown user", "smtp-id": message_id},
        {"email": "bob@example.com", "event": "spamreport", "smtp-id": "<other@x>"},
        {"email": "cy@example.com", "event": "bounce", "type": "blocked", "reason": "policy"},
        {"email": "dee@example.com", "event": "deferred"},
        {"email": "ed@example.com", "event": "delivered"},
    ]  # fmt: skip
    response = sendgrid_post(hook_client, sendgrid_key, events)
    assert response.status_code == 200 and response.get_json()["suppressed"] == 2
    assert entry(redis_client, "ann@example.com").source == "sendgrid"  # type: ignore[union-attr]
    assert entry(redis_client, "bob@example.com").reason == "complaint"  # type: ignore[union-attr]
    for address in ("cy@example.com", "dee@example.com", "ed@example.com"):
        assert entry(redis_client, address) is None
    assert [e["event"] for e in maillog.events(redis_client, mail_id)] == ["bounced"]


def test_sendgrid_refuses_wrong_stale_replayed_and_writes_nothing(
    hook_client: FlaskClient, redis_client: Redis, sendgrid_key: ec.EllipticCurvePrivateKey
) -> None:
    events = [{"email": "ann@example.com", "event": "spamreport"}]
    other_key = ec.generate_private_key(ec.SECP256R1())
    before = snapshot(redis_client)
    assert sendgrid_post(hook_client, other_key, events).status_code == 401
    raw = json.dumps(events).encode()
    tampered = sendgrid_post(hook_client, sendgrid_key, None, raw=raw + b" ", sign_body=raw)
    assert tampered.status_code == 401  # the body is not what was signed
    assert sendgrid_post(hook_client, sendgrid_key, events, at=time.time() - 400).status_code == 401
    unsigned = hook_client.post("/webhooks/sendgrid", json=events)
    assert unsigned.status_code == 401
    assert snapshot(redis_client) == before
    # Replayed: the same signed timestamp and body (even with a re-made signature).
    now = time.time()
    assert sendgrid_post(hook_client, sendgrid_key, events, at=now).status_code == 200
    suppression.remove(redis_client, "ann@example.com")
    before = snapshot(redis_client)
    assert sendgrid_post(hook_client, sendgrid_key, events, at=now).status_code == 409
    assert snapshot(redis_client) == before


def test_a_key_that_is_not_p256_stops_start_up(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = rsa_public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    monkeypatch.setenv("SENDGRID_WEBHOOK_PUBLIC_KEY", base64.b64encode(der).decode())
    with pytest.raises(ConfigError, match="SENDGRID_WEBHOOK_PUBLIC_KEY"):
        create_app()
    monkeypatch.setenv("SENDGRID_WEBHOOK_PUBLIC_KEY", "not base64!")
    with pytest.raises(ConfigError, match="SENDGRID_WEBHOOK_PUBLIC_KEY"):
        create_app()


# -- SES through SNS ----------------------------------------------------------------------


@pytest.fixture
def trusted(sns_key: rsa.RSAPrivateKey) -> Iterator[None]:
    """The test's certificate, put in the cache through ses.trust_certificate (the seam)."""
    ses.trust_certificate(CERT_URL, self_signed(sns_key))
    yield
    ses.CERTIFICATES.clear()


def sns_message(
    kind: str, key: rsa.RSAPrivateKey, version: str = "1", **fields: Any
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "Type": kind,
        "MessageId": fields.pop("MessageId", f"mid-{time.perf_counter_ns()}"),
        "TopicArn": TOPIC,
        "Timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "SignatureVersion": version,
        "SigningCertURL": CERT_URL,
        **fields,
    }
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 (SNS v1 is SHA1)
    signature = key.sign(ses.canonical(message), padding.PKCS1v15(), algorithm)
    message["Signature"] = base64.b64encode(signature).decode()
    return message


def ses_bounce(message_id: str, bounce_type: str = "Permanent") -> str:
    return json.dumps({
        "notificationType": "Bounce",
        "bounce": {"bounceType": bounce_type, "bounceSubType": "General", "bouncedRecipients": [
            {"emailAddress": "ann@example.com", "diagnosticCode": "smtp; 550 5.1.1 user unknown"},
        ]},
        "mail": {"messageId": "ses-id", "commonHeaders": {"messageId": message_id}},
    })  # fmt: skip


def sns_post(client: FlaskClient, message: dict[str, Any]) -> Any:
    return client.post("/webhooks/ses", data=json.dumps(message), content_type="text/plain")


@pytest.mark.parametrize("version", ["1", "2"])
def test_ses_permanent_bounce_with_signature_version(
    hook_client: FlaskClient, redis_client: Redis, sns_key: rsa.RSAPrivateKey, trusted: None,
    our_mail: tuple[str, str], version: str,
) -> None:  # fmt: skip
    mail_id, message_id = our_mail
    message = sns_message(
        "Notification", sns_key, version, Message=ses_bounce(message_id), Subject="Bounce"
    )
    response = sns_post(hook_client, message)
    assert response.status_code == 200, response.get_json()
    found = entry(redis_client, "ann@example.com")
    assert found is not None and (found.reason, found.source) == ("hard_bounce", "ses")
    assert "5.1.1" in found.detail
    assert [e["event"] for e in maillog.events(redis_client, mail_id)] == ["bounced"]


def test_ses_complaint_unsubscribes_a_digest_subscriber_and_transient_bounces_are_ignored(
    hooks: Flask, hook_client: FlaskClient, redis_client: Redis, sns_key: rsa.RSAPrivateKey,
    trusted: None,
) -> None:  # fmt: skip
    with hooks.app_context():
        digests.upsert_subscriber("bob@example.com", "UTC", "weekly")
    complaint = json.dumps({
        "eventType": "Complaint",
        "complaint": {"complaintFeedbackType": "abuse",
                      "complainedRecipients": [{"emailAddress": "bob@example.com"}]},
        "mail": {"headers": [{"name": "Message-ID", "value": "<nope@x>"}]},
    })  # fmt: skip
    assert (
        sns_post(
            hook_client, sns_message("Notification", sns_key, "2", Message=complaint)
        ).status_code
        == 200
    )
    assert entry(redis_client, "bob@example.com").detail == "abuse"  # type: ignore[union-attr]
    with hooks.app_context():
        assert digests.get_subscriber("bob@example.com").schedule.frequency == "off"  # type: ignore[union-attr]
    soft = sns_message("Notification", sns_key, Message=ses_bounce("<x@y>", "Transient"))
    assert sns_post(hook_client, soft).get_json()["suppressed"] == 0


def test_ses_refuses_bad_signature_stale_replay_foreign_topic_and_url(
    hook_client: FlaskClient, redis_client: Redis, sns_key: rsa.RSAPrivateKey, trusted: None
) -> None:
    good = sns_message("Notification", sns_key, Message=ses_bounce("<x@y>"))
    before = snapshot(redis_client)
    forged = {**good, "Message": ses_bounce("<other@y>")}
    assert sns_post(hook_client, forged).status_code == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert (
        sns_post(
            hook_client, sns_message("Notification", other, Message=ses_bounce("<x@y>"))
        ).status_code
        == 401
    )
    stale_at = (datetime.now(UTC) - timedelta(minutes=6)).isoformat().replace("+00:00", "Z")
    stale = sns_message("Notification", sns_key, Message=ses_bounce("<x@y>"))
    stale["Timestamp"] = stale_at
    stale = sns_message("Notification", sns_key, MessageId=stale["MessageId"],
                        Message=stale["Message"]) | {"Timestamp": stale_at}  # fmt: skip
    assert sns_post(hook_client, _resign(stale, sns_key)).status_code == 401
    foreign = _resign({**good, "TopicArn": "arn:aws:sns:eu-west-1:999999999999:theirs"}, sns_key)
    assert sns_post(hook_client, foreign).status_code == 403
    for url in ("http://sns.eu-west-1.amazonaws.com/a.pem", "https://evil.example/a.pem",
                "https://sns.eu-west-1.amazonaws.com.evil.example/a.pem",
                "https://sns.eu-west-1.amazonaws.com:8443/a.pem",
                "https://user@sns.eu-west-1.amazonaws.com/a.pem"):  # fmt: skip
        assert (
            sns_post(hook_client, _resign({**good, "SigningCertURL": url}, sns_key)).status_code
            == 401
        )
    assert sns_post(hook_client, {**good, "SignatureVersion": "3"}).status_code == 401
    assert snapshot(redis_client) == before
    assert sns_post(hook_client, good).status_code == 200
    suppression.remove(redis_client, "ann@example.com")
    before = snapshot(redis_client)
    assert sns_post(hook_client, good).status_code == 409
    assert snapshot(redis_client) == before


def _resign(message: dict[str, Any], key: rsa.RSAPrivateKey) -> dict[str, Any]:
    algorithm = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()  # noqa: S303
    signature = key.sign(ses.canonical(message), padding.PKCS1v15(), algorithm)
    return {**message, "Signature": base64.b64encode(signature).decode()}


def test_an_expired_certificate_is_refused(
    hook_client: FlaskClient, redis_client: Redis, sns_key: rsa.RSAPrivateKey
) -> None:
    ses.trust_certificate(CERT_URL, self_signed(sns_key, days=1, start=-10))
    try:
        message = sns_message("Notification", sns_key, Message=ses_bounce("<x@y>"))
        assert sns_post(hook_client, message).status_code == 401
        assert entry(redis_client, "ann@example.com") is None
    finally:
        ses.CERTIFICATES.clear()


def test_the_seam_takes_only_sns_urls(sns_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="not an SNS certificate URL"):
        ses.trust_certificate("https://evil.example/cert.pem", self_signed(sns_key))


def test_subscription_confirmation_is_kept_for_the_cli_never_fetched(
    hooks: Flask, hook_client: FlaskClient, redis_client: Redis, sns_key: rsa.RSAPrivateKey,
    trusted: None, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    def no_fetch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the service must not fetch anything")

    monkeypatch.setattr("urllib.request.urlopen", no_fetch)
    confirm = "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=t"
    message = sns_message(
        "SubscriptionConfirmation", sns_key, Message="You have chosen to subscribe...",
        SubscribeURL=confirm, Token="t0k3n",
    )  # fmt: skip
    response = sns_post(hook_client, message)
    assert response.status_code == 200
    result = hooks.test_cli_runner().invoke(args=["mail", "ses-confirmations"])
    assert TOPIC in result.output and confirm in result.output
    assert "1 awaiting confirmation" in result.output
    # Unverified, it is neither kept nor shown.
    redis_client.delete(ses.CONFIRMATIONS_KEY)
    forged = sns_message(
        "SubscriptionConfirmation", sns_key, Message="m", SubscribeURL=confirm, Token="t"
    )
    forged["SubscribeURL"] = "https://evil/"
    assert sns_post(hook_client, forged).status_code == 401
    assert not redis_client.exists(ses.CONFIRMATIONS_KEY)


# -- Postmark -----------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def postmark_bounce(record_id: int = 42, kind: str = "HardBounce", **extra: Any) -> dict[str, Any]:
    return {
        "RecordType": "Bounce", "ID": record_id, "Type": kind, "Email": "ann@example.com",
        "BouncedAt": datetime.now(UTC).isoformat(), "Details": "smtp;550 5.1.1 no such user",
        **extra,
    }  # fmt: skip


def test_postmark_hard_bounce_and_complaint(
    hook_client: FlaskClient, redis_client: Redis, our_mail: tuple[str, str]
) -> None:
    mail_id, _ = our_mail
    auth = basic("postmark", "pm-secret")
    body = postmark_bounce(Metadata={"mail_id": mail_id})
    assert hook_client.post("/webhooks/postmark", json=body, headers=auth).status_code == 200
    assert entry(redis_client, "ann@example.com").source == "postmark"  # type: ignore[union-attr]
    assert [e["event"] for e in maillog.events(redis_client, mail_id)] == ["bounced"]
    spam = postmark_bounce(7, Email="bob@example.com") | {"RecordType": "SpamComplaint"}
    assert hook_client.post("/webhooks/postmark", json=spam, headers=auth).status_code == 200
    assert entry(redis_client, "bob@example.com").reason == "complaint"  # type: ignore[union-attr]
    soft = postmark_bounce(8, "SoftBounce", Email="cy@example.com")
    assert (
        hook_client.post("/webhooks/postmark", json=soft, headers=auth).get_json()["suppressed"]
        == 0
    )


def test_postmark_refuses_wrong_credentials_stale_replayed(
    hook_client: FlaskClient, redis_client: Redis
) -> None:
    before = snapshot(redis_client)
    wrong = [basic("postmark", "wrong"), basic("other", "pm-secret")]
    wrong += [{}, {"Authorization": "Basic !!!"}, {"Authorization": "Bearer pm-secret"}]
    for headers in wrong:
        response = hook_client.post("/webhooks/postmark", json=postmark_bounce(), headers=headers)
        assert response.status_code == 401 and "Basic" in response.headers["WWW-Authenticate"]
    auth = basic("postmark", "pm-secret")
    old = postmark_bounce(BouncedAt=(datetime.now(UTC) - timedelta(minutes=10)).isoformat())
    assert hook_client.post("/webhooks/postmark", json=old, headers=auth).status_code == 401
    assert snapshot(redis_client) == before
    assert (
        hook_client.post("/webhooks/postmark", json=postmark_bounce(), headers=auth).status_code
        == 200
    )
    suppression.remove(redis_client, "ann@example.com")
    before = snapshot(redis_client)
    assert (
        hook_client.post("/webhooks/postmark", json=postmark_bounce(), headers=auth).status_code
        == 409
    )
    assert snapshot(redis_client) == before


def test_postmark_needs_both_credentials(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTMARK_WEBHOOK_USER", "postmark")
    with pytest.raises(ConfigError, match="POSTMARK_WEBHOOK_PASSWORD"):
        create_app()


def test_a_webhook_bounce_stops_the_next_mail(
    hooks: Flask, hook_client: FlaskClient, smtp_server: SMTPServer, redis_client: Redis,
) -> None:  # fmt: skip
    hook_client.post("/webhooks/mailgun", json=mailgun_body(mailgun_failed()))
    with hooks.app_context():
        job = send_email("ann@example.com", "Again", "test", address="x")
    assert status.load(redis_client, job.id).status == status.SUPPRESSED  # type: ignore[union-attr]


def test_an_unknown_certificate_is_refused_when_it_cannot_be_fetched(
    hook_client: FlaskClient, redis_client: Redis, sns_key: rsa.RSAPrivateKey
) -> None:
    ses.CERTIFICATES.clear()
    before = snapshot(redis_client)
    message = sns_message("Notification", sns_key, Message=ses_bounce("<x@y>"))
    response = sns_post(hook_client, message)
    assert response.status_code == 401 and "could not be fetched" in response.get_json()["error"]
    assert snapshot(redis_client) == before
