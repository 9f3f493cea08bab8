"""Celery application used by the Celery + Redis peer benchmark.

Broker and result backend are both Redis (``CELERY_REDIS_URL``, default
``redis://127.0.0.1:6390/0``).  A job is acknowledged only after it has run
(``task_acks_late``), the same at-least-once guarantee the fleet's queue gives,
and the prefetch multiplier is Celery's own default, 4.

``CELERY_PREFETCH_MULTIPLIER`` overrides the prefetch multiplier.  With
Celery 5.2 / kombu 5.2 on Redis, late acks plus a multiplier of 1 make the
worker sit idle for 1-2 s at a time whenever jobs are queued behind the ones
it holds (celery issues #4378, #7718), which caps throughput near 30 jobs/s:
measuring that would measure the bug, not Celery.
"""

import os

from celery import Celery

REDIS_URL = os.environ.get("CELERY_REDIS_URL", "redis://127.0.0.1:6390/0")
PREFETCH_MULTIPLIER = int(os.environ.get("CELERY_PREFETCH_MULTIPLIER", "4"))

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
