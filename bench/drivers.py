"""Rows that run in one process of their own: `python -m bench.drivers ROW N`.

- `classic`: the classic Flask-Mail recipe (render in the request, then a thread
  per mail that calls `mail.send`, which opens an SMTP connection per mail).
- `limit`: the in-process limit: mailqueue's own render + MIME build
  (`build_message`) and send over one persistent connection (`Mailer`), in a
  loop, no queue.
- `limit-stock`: the same with Flask-Mail's own `as_bytes` (how the issue
  measured the limit, before MailMessage serialised mail itself).

Each sends a few warm-up mails first, then prints one JSON line: when each
mail was submitted (`time.monotonic()`, by Message-ID), the CPU seconds of the
timed part and the process's peak RSS.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time

from bench.procs import status_field
from bench.workload import TEMPLATE, mail, make_app, message_id

WARMUP = 4  # mails sent before the clock starts (Message-IDs with "-warm-"; not counted)


def run_classic(n: int, deadline: float) -> tuple[dict[str, float], float]:
    from flask import Flask
    from flask_mail import Mail, Message

    from bench.workload import classic_message

    app = make_app()
    mail_ext: Mail = app.extensions["mail"]

    def send_async_email(app: Flask, msg: Message) -> None:
        with app.app_context():
            mail_ext.send(msg)

    def submit(msg_id: str, i: int) -> threading.Thread:
        with app.app_context():  # what a request has
            msg = classic_message(msg_id, *mail(i))
            thread = threading.Thread(target=send_async_email, args=(app, msg))
            thread.start()
        return thread

    for i in range(WARMUP):
        submit(message_id("a-warm", i), i).join()
    submitted: dict[str, float] = {}
    threads = []
    cpu = time.process_time()
    for i in range(n):
        started = time.monotonic()
        threads.append(submit(message_id("a", i), i))
        submitted[message_id("a", i)] = started
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return submitted, time.process_time() - cpu


def run_limit(n: int, deadline: float, stock: bool = False) -> tuple[dict[str, float], float]:
    from flask_mail import Message

    from app.mail import build_message
    from app.smtp import get_mailer
    from app.status import MailRecord

    app = make_app()

    def send(mail_id: str, i: int) -> None:
        to, subject, context = mail(i)
        record = MailRecord(
            id=mail_id, to=[to], subject=subject, template=TEMPLATE, context=context
        )
        message = build_message(record)
        if stock:  # Flask-Mail's own MIME build, as the issue measured the limit
            message.as_bytes = functools.partial(Message.as_bytes, message)  # type: ignore[method-assign]
        mailer.send(message)

    row = "e0" if stock else "e"
    submitted: dict[str, float] = {}
    with app.app_context():
        mailer = get_mailer()
        for i in range(WARMUP):
            send(f"bench-{row}-warm-{i}", i)
        cpu = time.process_time()
        for i in range(n):
            if time.monotonic() > deadline:
                break
            started = time.monotonic()
            send(f"bench-{row}-{i}", i)
            submitted[message_id(row, i)] = started
        cpu = time.process_time() - cpu
        mailer.close()
    return submitted, cpu


def main() -> None:
    row, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.monotonic() + seconds
    runner = {
        "classic": run_classic,
        "limit": run_limit,
        "limit-stock": functools.partial(run_limit, stock=True),
    }[row]
    submitted, cpu = runner(n, deadline)
    report = {
        "submitted": submitted,
        "cpu": cpu,
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report
        # the harness that forked this process.
        "maxrss_kb": status_field(os.getpid(), "VmHWM") // 1024,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
