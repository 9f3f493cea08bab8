"""Celery application used by the Celery + Redis peer benchmark.

Broker and result backend are both Redis (``CELERY_REDIS_URL``, default
``redis://127.0.0.1:6390/0``).  Settings favour at-least-once delivery, the
same guarantee the fleet's queue gives: a job is acknowledged only after it has
run (``task_acks_late``) and each worker process reserves one job at a time
(``worker_prefetch_multiplier=1``).
"""

import os

from celery import Celery

REDIS_URL = os.environ.get("CELERY_REDIS_URL", "redis://127.0.0.1:6390/0")

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="tasks.echo")
def echo(payload):
    """Return the payload unchanged (the job does no work of its own)."""
    return payload
