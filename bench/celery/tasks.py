"""Celery application used by the Celery + Redis peer benchmark.

Broker and result backend are both Redis (``CELERY_REDIS_URL``, default
``redis://127.0.0.1:6390/0``).  Settings favour at-least-once delivery, the
same guarantee the fleet's queue gives: a job is acknowledged only after it has
run (``task_acks_late``) and each worker process reserves one job at a time
(``worker_prefetch_multiplier=1``).

``CELERY_PREFETCH_MULTIPLIER`` overrides the prefetch multiplier.  With
Celery 5.2 / kombu 5.2 on Redis, late acks plus a multiplier of 1 make the
worker sit idle for 1-2 s at a time whenever jobs are queued behind the ones
it holds, which caps throughput far below what the same worker reaches with a
multiplier of 2 or more.
"""

import os

from celery import Celery

REDIS_URL = os.environ.get("CELERY_REDIS_URL", "redis://127.0.0.1:6390/0")
PREFETCH_MULTIPLIER = int(os.environ.get("CELERY_PREFETCH_MULTIPLIER", "1"))

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="tasks.echo")
def echo(payload):
    """Return the payload unchanged (the job does no work of its own)."""
    return payload
