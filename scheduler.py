"""The Procfile's `scheduler:` process: register periodic jobs, then run rq-scheduler.

Digest dispatch registration lands with the digest issue; until then this only
runs rq-scheduler's loop so the Procfile line works.
"""

from __future__ import annotations

import logging

from rq_scheduler import Scheduler

from app import create_app
from app.queues import get_redis


def main() -> None:
    app = create_app()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s"
    )
    scheduler = Scheduler(queue_name="digests", connection=get_redis(app), interval=60)
    scheduler.run()


if __name__ == "__main__":
    main()
