"""`flask mail ...` and `flask digest ...` commands."""

from __future__ import annotations

from datetime import datetime

import click
import redis.exceptions
from flask import Flask
from flask.cli import AppGroup

from app import digests
from app.errors import InvalidMailError, QueueUnavailableError, SubscriberNotFoundError
from app.mail import send_email

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
        result = digests.dispatch_due(now)
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    click.echo(
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
    due = shown.due.isoformat() if shown.due else "never (frequency off)"
    click.echo(f"To: {shown.email}")
    click.echo(f"Subject: {shown.subject}")
    click.echo(f"Period: {shown.period} (due {due}), {shown.items} pending items")
    click.echo("")
    click.echo(shown.rendered.html if as_html and shown.rendered.html else shown.rendered.text)


def init_app(app: Flask) -> None:
    app.cli.add_command(mail_cli)
    app.cli.add_command(digest_cli)
