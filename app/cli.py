"""`flask mail ...` and `flask digest ...` commands.

Operator tools print one line per mail they touch and a count at the end, so
their output can be read by a person and grepped by a script.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
import redis.exceptions
from flask import Flask
from flask.cli import AppGroup
from rq.job import Job
from rq.results import Result

from app import digests, status, templatecheck
from app.errors import (
    InvalidMailError,
    MailNotFailedError,
    QueueUnavailableError,
    SubscriberNotFoundError,
    UnknownMailError,
)
from app.mail import requeue_failed, send_email
from app.progress import Progress
from app.queues import MAIL_QUEUES, PRIORITIES, get_queue, get_redis

mail_cli = AppGroup("mail", help="Transactional mail.")
digest_cli = AppGroup("digest", help="Scheduled digests.")


@mail_cli.command("send-test")
@click.argument("address")
def send_test(address: str) -> None:
    """Queue the built-in test message to ADDRESS (a worker delivers it)."""
    try:
        job = send_email(address, "Test message", "test", address=address)
    except (InvalidMailError, QueueUnavailableError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"queued test mail {job.id} to {address}")


@mail_cli.command("check-templates")
def check_templates() -> None:
    """Render every template under templates/email/ with its .preview.json sample, both
    parts, undefined variables as errors; exit 1 naming template and line of each problem."""
    names, problems = templatecheck.check_templates()
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        click.echo(f"{len(problems)} of {len(names)} templates have problems", err=True)
        raise SystemExit(1)
    click.echo(f"{len(names)} templates render with their samples")


@digest_cli.command("run")
@click.option(
    "--at",
    metavar="ISO-TIME",
    help="Dispatch as if it were this time (with a UTC offset, e.g. 2026-11-27T08:00Z).",
)
def digest_run(at: str | None) -> None:
    """Enqueue every digest that is due now (a worker sends them)."""
    now = None
    if at:
        try:
            now = datetime.fromisoformat(at)
        except ValueError:
            raise click.BadParameter("not an ISO 8601 date-time", param_hint="--at") from None
        if now.tzinfo is None or now.utcoffset() is None:
            raise click.BadParameter("give a UTC offset, e.g. ...T08:00Z", param_hint="--at")
    try:
        with Progress("dispatching due digests", digests.count_due(now)) as progress:
            result = digests.dispatch_due(now, on_batch=progress.advance)
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    progress.summary(
        f"due: {result.due}, enqueued: {result.enqueued}, skipped: {result.skipped}"
        f" ({result.jobs} digest jobs)"
    )


@digest_cli.command("preview")
@click.argument("email")
@click.option("--html", "as_html", is_flag=True, help="Print the HTML part instead of the text.")
def digest_preview(email: str, as_html: bool) -> None:
    """Render EMAIL's next digest from what is pending; claims and sends nothing."""
    try:
        shown = digests.preview(email)
    except (InvalidMailError, SubscriberNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    due = shown.due.isoformat() if shown.due else "never (frequency off)"
    click.echo(f"To: {shown.email}")
    click.echo(f"Subject: {shown.subject}")
    click.echo(f"Period: {shown.period} (due {due}), {shown.items} pending items")
    click.echo("")
    click.echo(shown.rendered.html if as_html and shown.rendered.html else shown.rendered.text)


@mail_cli.command("failed")
def list_failed() -> None:
    """List failed mail, oldest first, with the reason each failed."""
    redis_client = get_redis()
    try:
        ids = status.failed_ids(redis_client)
        records = status.load_many(redis_client, ids)
        gone = [mail_id for mail_id, record in zip(ids, records, strict=True) if record is None]
        if gone:  # expired records leave their index entry behind
            redis_client.zrem(status.FAILED_INDEX, *gone)
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    lanes = dict.fromkeys(PRIORITIES, 0)
    for record in records:
        if record is None or record.status != status.FAILED:
            continue
        lanes[record.priority] = lanes.get(record.priority, 0) + 1
        click.echo(
            f"{record.id}  {record.updated_at}  to={','.join(record.to)}  "
            f"priority={record.priority}  attempts={record.attempts}  "
            f"{record.last_error or 'no reason recorded'}"
        )
        for address, reply in record.refused.items():
            click.echo(f"    refused {address}: {reply}")
    by_lane = ", ".join(f"{name} {count}" for name, count in lanes.items())
    click.echo(f"{sum(lanes.values())} failed mail ({by_lane})")


@mail_cli.command("retry")
@click.argument("mail_ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Re-queue every failed mail.")
def retry(mail_ids: tuple[str, ...], retry_all: bool) -> None:
    """Re-queue failed mail by ID (or --all): same id and Message-ID, status queued."""
    if bool(mail_ids) == retry_all:
        raise click.UsageError("give one or more mail IDs, or --all")
    try:
        targets = list(mail_ids) or status.failed_ids(get_redis())
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    done = skipped = 0
    # --all may be thousands: a progress line every few seconds instead of one per mail.
    with Progress("re-queueing failed mail", len(targets)) as progress:
        for mail_id in targets:
            try:
                record = requeue_failed(mail_id)
            except (UnknownMailError, MailNotFailedError) as err:
                skipped += 1
                click.echo(f"skipped {mail_id}: {err}")
                continue
            except QueueUnavailableError as err:
                raise click.ClickException(f"{err} ({done} re-queued before it went away)") from err
            finally:
                progress.advance()
            done += 1
            if not retry_all:
                click.echo(f"re-queued {record.id} to {','.join(record.to)}")
    progress.summary(f"{done} re-queued, {skipped} skipped")
    if skipped and not retry_all:
        raise SystemExit(1)


@mail_cli.command("purge")
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0),
    required=True,
    help="Purge sent and failed mail last updated more than DAYS days ago.",
)
def purge(days: float) -> None:
    """Delete finished (sent or failed) mail records older than DAYS, with their RQ jobs.

    Mail still queued, scheduled or being retried is never purged.
    """
    redis_client = get_redis()
    failed_keys = [get_queue(name).failed_job_registry.key for name in MAIL_QUEUES]
    cutoff = datetime.now(UTC) - timedelta(days=days)
    scanned = purged = 0
    try:
        for ids in status.scan_ids(redis_client):
            records = status.load_many(redis_client, ids)
            with redis_client.pipeline(transaction=False) as pipe:
                for record in records:
                    if record is None or record.status not in status.FINAL:
                        continue
                    if not record.updated_at or datetime.fromisoformat(record.updated_at) > cutoff:
                        continue
                    status.delete(pipe, record.id)
                    for failed_key in failed_keys:
                        pipe.zrem(failed_key, record.id)
                    pipe.delete(Job.key_for(record.id), Result.get_key(record.id))
                    purged += 1
                pipe.execute()
            scanned += len(ids)
            click.echo(f"scanned {scanned}, purged {purged}")
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err} ({purged} purged)") from err
    click.echo(f"{purged} purged of {scanned} mail records")


def init_app(app: Flask) -> None:
    app.cli.add_command(mail_cli)
    app.cli.add_command(digest_cli)
