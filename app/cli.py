"""`flask mail ...` commands (and the place for `flask digest ...`)."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup

from app.errors import InvalidMailError, QueueUnavailableError
from app.mail import send_email

mail_cli = AppGroup("mail", help="Transactional mail.")


@mail_cli.command("send-test")
@click.argument("address")
def send_test(address: str) -> None:
    """Queue the built-in test message to ADDRESS (a worker delivers it)."""
    try:
        job = send_email(address, "Test message", "test", address=address)
    except (InvalidMailError, QueueUnavailableError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"queued test mail {job.id} to {address}")


def init_app(app: Flask) -> None:
    app.cli.add_command(mail_cli)
