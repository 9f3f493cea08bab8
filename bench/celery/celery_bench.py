#!/usr/bin/env python3
"""Celery + Redis peer benchmark driver.

Expects a Celery worker for ``tasks.app`` to be running already (run.sh starts
one with ``--concurrency 2 --pool prefork``).  Two measurements:

Throughput
    N echo jobs are submitted back to back with ``apply_async``; then every
    result is fetched with ``AsyncResult.get`` in submission order.
    jobs/s = N / (first submit -> last result received).  Submission overlaps
    with execution, as it would for any producer.

Latency at a fixed rate
    Jobs are submitted on a fixed schedule (one every 1/rate s, absolute
    deadlines, so a late submit does not shift the following ones).  Latency
    of a job = time its result notification reaches the client minus the time
    just before its ``apply_async`` call.  Completion is observed without
    polling: Celery's Redis result backend stores a result and PUBLISHes it on
    the channel ``celery-task-meta-<task id>``, which is exactly the message
    that wakes ``AsyncResult.get``.  A listener thread holds one
    pattern subscription on its own connection and timestamps each message
    as it arrives, so results finishing out of order are timed correctly and
    the collector costs one socket read per job.  Task ids are generated
    before submission so both sides key on the same id without coordination.
    After the run every result is also fetched through ``AsyncResult.get``
    and checked against its payload.

The last line printed is one JSON object with the figures.
"""

import argparse
import json
import sys
import threading
import time
import uuid

import celery
import redis

from tasks import REDIS_URL, app, echo

RESULT_PREFIX = "celery-task-meta-"


def make_payload(seq, size):
    return {"seq": seq, "data": "x" * size}


def percentile(sorted_values, p):
    """Linear-interpolated percentile (p in [0, 100]) of a sorted list."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def warm_up(n, payload_bytes, timeout):
    """Run a few jobs so worker processes and connections are all set up."""
    results = [echo.apply_async(args=(make_payload(-1, payload_bytes),)) for _ in range(n)]
    for r in results:
        r.get(timeout=timeout)


def measure_throughput(count, payload_bytes, timeout):
    payloads = [make_payload(i, payload_bytes) for i in range(count)]
    t0 = time.perf_counter()
    results = [echo.apply_async(args=(p,)) for p in payloads]
    t_submitted = time.perf_counter()
    for r, p in zip(results, payloads):
        if r.get(timeout=timeout) != p:
            raise RuntimeError("result mismatch for task %s" % r.id)
    t_end = time.perf_counter()
    elapsed = t_end - t0
    return {
        "jobs": count,
        "elapsed_s": elapsed,
        "submit_s": t_submitted - t0,
        "jobs_per_s": count / elapsed,
    }


class ResultListener(threading.Thread):
    """Timestamps every result notification published by the result backend."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._stop_evt = threading.Event()
        self.arrivals = {}  # task id -> perf_counter() at notification
        self.ready = threading.Event()

    def run(self):
        self._pubsub.psubscribe(RESULT_PREFIX + "*")
        # Wait for the subscription to be confirmed before letting jobs go.
        while self._pubsub.get_message(timeout=1.0) is None:
            pass
        self.ready.set()
        prefix_len = len(RESULT_PREFIX)
        while not self._stop_evt.is_set():
            msg = self._pubsub.get_message(timeout=0.2)
            if msg is None or msg["type"] != "pmessage":
                continue
            now = time.perf_counter()
            self.arrivals[msg["channel"][prefix_len:].decode()] = now

    def stop(self):
        self._stop_evt.set()
        self.join()
        self._pubsub.close()
        self._client.close()


def measure_latency(count, rate, payload_bytes, timeout):
    listener = ResultListener(REDIS_URL)
    listener.start()
    if not listener.ready.wait(timeout):
        raise RuntimeError("result listener did not subscribe")

    jobs = [(str(uuid.uuid4()), make_payload(i, payload_bytes)) for i in range(count)]
    submit_times = {}
    results = []
    interval = 1.0 / rate
    max_lag = 0.0
    t0 = time.perf_counter()
    for i, (task_id, payload) in enumerate(jobs):
        due = t0 + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        now = time.perf_counter()
        max_lag = max(max_lag, now - due)
        submit_times[task_id] = now
        results.append(echo.apply_async(args=(payload,), task_id=task_id))
    submit_span = time.perf_counter() - t0

    deadline = time.perf_counter() + timeout
    while len(listener.arrivals) < count and time.perf_counter() < deadline:
        time.sleep(0.01)
    listener.stop()

    # Cross-check through Celery's own client API.
    for r, (_, payload) in zip(results, jobs):
        if r.get(timeout=timeout) != payload:
            raise RuntimeError("result mismatch for task %s" % r.id)

    missing = [tid for tid, _ in jobs if tid not in listener.arrivals]
    if missing:
        raise RuntimeError("%d result notifications not observed" % len(missing))
    lat_ms = sorted((listener.arrivals[tid] - submit_times[tid]) * 1000.0 for tid, _ in jobs)
    # If the worker cannot keep up, results trail the submissions and
    # latency becomes queueing time; the drain time shows when that happened.
    drain_s = max(listener.arrivals[tid] for tid, _ in jobs) - t0 - submit_span
    return {
        "count": count,
        "rate": rate,
        "achieved_rate": (count - 1) / submit_span if count > 1 else float("nan"),
        "max_submit_lag_ms": max_lag * 1000.0,
        "p50_ms": percentile(lat_ms, 50),
        "p90_ms": percentile(lat_ms, 90),
        "p99_ms": percentile(lat_ms, 99),
        "max_ms": lat_ms[-1],
        "drain_s": drain_s,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="jobs in the throughput run")
    ap.add_argument("--rate", type=float, default=200.0, help="submit rate (jobs/s) in the latency run")
    ap.add_argument("--latency-count", type=int, default=1000, help="jobs in the latency run")
    ap.add_argument("--payload-bytes", type=int, default=64, help="size of the string in each payload")
    ap.add_argument("--warmup", type=int, default=50, help="jobs run before measuring")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for any result")
    args = ap.parse_args()
    if args.count < 1 or args.latency_count < 1 or args.rate <= 0:
        ap.error("--count, --latency-count and --rate must be positive")

    print("celery %s, broker/backend %s, acks_late=%s, prefetch_multiplier=%s"
          % (celery.__version__, REDIS_URL, app.conf.task_acks_late,
             app.conf.worker_prefetch_multiplier), file=sys.stderr)
    warm_up(args.warmup, args.payload_bytes, args.timeout)

    tp = measure_throughput(args.count, args.payload_bytes, args.timeout)
    print("throughput: %d jobs in %.3f s (submit phase %.3f s) -> %.1f jobs/s"
          % (tp["jobs"], tp["elapsed_s"], tp["submit_s"], tp["jobs_per_s"]), file=sys.stderr)

    lat = measure_latency(args.latency_count, args.rate, args.payload_bytes, args.timeout)
    print("latency: %d jobs at %.0f/s (achieved %.1f/s, max submit lag %.2f ms, "
          "last result %.3f s after last submit): "
          "p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms"
          % (lat["count"], lat["rate"], lat["achieved_rate"], lat["max_submit_lag_ms"],
             lat["drain_s"], lat["p50_ms"], lat["p90_ms"], lat["p99_ms"], lat["max_ms"]),
          file=sys.stderr)

    print(json.dumps({
        "system": "celery",
        "jobs": tp["jobs"],
        "jobs_per_s": round(tp["jobs_per_s"], 1),
        "latency_rate": int(lat["rate"]) if lat["rate"].is_integer() else lat["rate"],
        "p50_ms": round(lat["p50_ms"], 3),
        "p99_ms": round(lat["p99_ms"], 3),
    }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
