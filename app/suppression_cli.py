"""`flask mail suppress`, `unsuppress`, `suppressions`: the suppression list for operators
(and `flask mail ses-confirmations`, the SNS subscriptions waiting to be confirmed).

Commands of app.cli's `mail` group, kept here so app/cli.py stays as it was.
"""

from __future__ import annotations

import click
import redis.exceptions
from flask import Flask
from flask.cli import with_appcontext

from app import deliverability, digests, suppression
from app.cli import mail_cli
from app.errors import InvalidMailError
from app.queues import get_redis


def _address(raw: str) -> str:
    try:
        return digests.normalize_email(raw)
    except InvalidMailError as err:
        raise click.BadParameter(str(err).removeprefix("email: "), param_hint="ADDRESS") from None


@click.command("suppress")
@click.argument("address")
@click.option(
    "--reason",
    type=click.Choice(suppression.REASONS),
    default=suppression.MANUAL,
    show_default=True,
)
@click.option("--detail", default="", help="Why, for whoever reads the list later.")
@with_appcontext
def suppress(address: str, reason: str, detail: str) -> None:
    """Stop mailing ADDRESS: later mail to it is recorded as suppressed, not sent."""
    try:
        entry = deliverability.suppress(_address(address), reason, "cli", detail)
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    click.echo(f"suppressed {entry.address} ({entry.reason})")


@click.command("unsuppress")
@click.argument("address")
@with_appcontext
def unsuppress(address: str) -> None:
    """Mail ADDRESS again; exit 1 if it was not suppressed."""
    plain = _address(address)
    try:
        removed = suppression.remove(get_redis(), plain)
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    if not removed:
        click.echo(f"{plain} was not suppressed", err=True)
        raise SystemExit(1)
    click.echo(f"unsuppressed {plain}")


@click.command("suppressions")
@with_appcontext
def list_suppressions() -> None:
    """Every suppressed address, newest first: address, reason, source, when, detail."""
    redis_client = get_redis()
    shown = 0
    try:
        while True:
            entries, _total = suppression.page(redis_client, shown, 500)
            for entry in entries:
                click.echo(
                    f"{entry.address}  {entry.reason}  {entry.source}  {entry.at}  {entry.detail}"
                )
            shown += len(entries)
            if len(entries) < 500:
                break
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    click.echo(f"{shown} suppressed")


@click.command("ses-confirmations")
@with_appcontext
def ses_confirmations() -> None:
    """SNS subscriptions (SES bounces and complaints) waiting for an operator to confirm
    them: open each SubscribeURL once. mailqueue never fetches it itself."""
    from app.webhooks import ses

    try:
        pending = ses.confirmations()
    except redis.exceptions.RedisError as err:
        raise click.ClickException(f"Redis unavailable: {err}") from err
    for entry in pending:
        click.echo(f"{entry['topic']}  {entry['at']}\n    {entry['subscribe_url']}")
    click.echo(f"{len(pending)} awaiting confirmation")


def init_app(app: Flask) -> None:
    for command in (suppress, unsuppress, list_suppressions, ses_confirmations):
        mail_cli.add_command(command)
