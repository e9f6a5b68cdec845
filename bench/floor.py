"""Row (f), the floor: `python -m bench.floor`, one process of it per worker.

Not a worker anyone should run: it measures the least CPU a queue can spend on a
mail while keeping what every mailqueue mail gets, so the bench can show whether a
target against (e) is out of reach of any worker, RQ's or not. Per mail it does
only that: claim the attempt (the record's lease; the reply is the record to
render), the `sending` event line, render + MIME build + send over one persistent
connection, `sent` recorded, the `sent` event line, the job hash deleted. No RQ
code runs, no job is restored, there is no timeout alarm, no started registry, and
jobs are popped 16 at a time with LPOP, which a crash would lose (a real queue
moves them to a list of its own and removes each when done: more work, not less,
so the floor stays a floor). Each Redis step shares its round trip with the next
one: `sent` for one mail goes out with the claim of the next, right after the
server accepted, so per mail there is one Redis round trip.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from bench.workload import make_app

BATCH = 16
QUEUE_KEY = "rq:queue:mail"  # the Procfile worker's queue, filled by send_email()
JOB_KEY = "rq:job:"


def main() -> None:
    from app import events, status
    from app.mail import build_message
    from app.queues import get_redis
    from app.smtp import get_mailer

    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    app = make_app()
    with app.app_context():
        redis = get_redis()
        mailer = get_mailer()
        ttl = app.config["MAIL_STATUS_TTL"]
        lease = app.config["MAIL_JOB_TIMEOUT"] + status.LEASE_GRACE_SECONDS
        sent: tuple[str, str, Any] | None = None  # (mail id, template, refused) to record

        def round_trip(claim: str | None) -> Any:
            """Record the last mail's `sent` (if any) with the next step, one round trip."""
            nonlocal sent
            with redis.pipeline(transaction=False) as pipe:
                if sent is not None:
                    mail_id, template, refused = sent
                    status.queue_finish(
                        pipe, mail_id, status.SENT, ttl, metric_template=template, refused=refused
                    )
                    pipe.delete(JOB_KEY + mail_id)
                    sent = None
                if claim is None:
                    pipe.lpop(QUEUE_KEY, BATCH)
                else:
                    status.queue_begin_attempt(pipe, claim, lease)
                return pipe.execute()[-1]

        while not stopping:
            ids = round_trip(None)
            if not ids:  # wait for work
                popped = redis.blmpop(0.2, 1, QUEUE_KEY, direction="LEFT", count=BATCH)
                ids = popped[1] if popped else []
            for raw_id in ids:
                mail_id = raw_id.decode()
                outcome, record = status.attempt_from_reply(round_trip(mail_id))
                if outcome != "go" or record is None:
                    continue
                events.emit(events.SENDING, mail_id=mail_id, template=record.template,
                            attempt=record.attempts)  # fmt: skip
                refused = mailer.send(build_message(record))
                sent = (mail_id, record.template, refused)
                events.emit(events.SENT, mail_id=mail_id, template=record.template,
                            attempt=record.attempts, recipients=len(record.to))  # fmt: skip
        if sent is not None:
            round_trip(None)
        mailer.close()


if __name__ == "__main__":
    main()
