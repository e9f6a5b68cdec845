"""Row (b): Celery 5 with a Redis broker, the way a Flask app usually wires it.

The Flask app is built when the worker imports this module (before prefork),
each task renders in an app context and sends with `mail.send`, as the classic
recipe does (one SMTP connection per mail). Results are ignored, as they would
be for mail. Started by the harness as
`celery -A bench.celery_app worker -P prefork -c 2`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from flask_mail import Mail

from bench.workload import classic_message, mail, make_app, message_id

flask_app = make_app()

celery = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/1"))
celery.conf.update(
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@celery.task(name="bench.send_mail")
def send_mail(msg_id: str, to: str, subject: str, context: dict[str, Any]) -> None:
    with flask_app.app_context():
        mail: Mail = flask_app.extensions["mail"]
        mail.send(classic_message(msg_id, to, subject, context))


def submit(row: str, i: int) -> str:
    """What the web process calls: one task per mail, carrying the mail's data."""
    msg_id = message_id(row, i)
    send_mail.delay(msg_id, *mail(i))
    return msg_id
