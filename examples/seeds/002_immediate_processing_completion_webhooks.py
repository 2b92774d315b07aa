"""Jobs processed the moment they are queued, a completion webhook for each, FIFO per user,
and metrics.

By hand: a Worker adds a generation job to a queue, nothing drains it, so it starts the work
itself in waitUntil() and POSTs a webhook to the Next.js app when done; ordering and metrics
are left for later.
With queue_ext: the worker sleeps in LISTEN queue_ext_jobs and claims as soon as an enqueue
commits; the queue's callback_url gets a signed job.completed (or job.failed/job.dead)
webhook for every finished attempt, delivered durably by the dispatcher; a concurrency limit
of 1 per user key runs each user's jobs one at a time in enqueue order; queue_stats() and
metrics() report the rest.

    DATABASE_URL=... CALLBACK_URL=http://127.0.0.1:3000/api/webhooks WEBHOOK_SECRET=whsec_... \\
        python3 002_immediate_processing_completion_webhooks.py
"""
import json
import os
import time

import psycopg
from psycopg.types.json import Jsonb

QUEUE = "generations"
conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
conn.execute("SELECT queue_ext.create_queue(%s, if_not_exists => true, callback_url => %s, webhook_secret => %s)",
             (QUEUE, os.environ["CALLBACK_URL"], os.environ["WEBHOOK_SECRET"]))
for user in ("alice", "bob"):
    conn.execute("SELECT queue_ext.set_concurrency_limit(%s, 1)", (f"user:{user}",))

listener = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
listener.execute("LISTEN queue_ext_jobs")

# The producer (the API route): enqueue and return; nothing else to trigger.
submitted = []
for n, user in enumerate(["alice", "alice", "bob", "alice", "bob"]):
    job_id = conn.execute("SELECT queue_ext.enqueue_job(%s, %s, concurrency_key => %s)",
                          (QUEUE, Jsonb({"user": user, "prompt": f"shot {n}"}), f"user:{user}")).fetchone()[0]
    submitted.append((str(job_id), user))

# The worker: claims and completes until `count` jobs are done, sleeping in LISTEN when idle.
order = []


def work(count):
    while len(order) < count:
        row = conn.execute("SELECT job_id, payload, lease_token FROM queue_ext.get_next_job(%s, 'gen-worker')",
                           (QUEUE,)).fetchone()
        if row is None:
            for _ in listener.notifies(timeout=1.0, stop_after=1):
                pass
            continue
        job_id, payload, token = row
        order.append((str(job_id), payload["user"]))
        conn.execute("SELECT queue_ext.complete_job(%s, %s, lease_token => %s)",
                     (job_id, Jsonb({"video_url": f"https://cdn.example/{job_id}.mp4"}), token))


work(len(submitted))
# Immediate: an idle worker is woken by the enqueue's commit, not by a poll.
started = time.monotonic()
submitted.append((str(conn.execute("SELECT queue_ext.enqueue_job(%s, '{\"user\": \"carol\"}')", (QUEUE,)).fetchone()[0]), "carol"))
work(len(submitted))
wake_to_done_s = time.monotonic() - started

stats = conn.execute("SELECT completed_last_hour, mean_wait FROM queue_ext.queue_stats() WHERE queue_name = %s",
                     (QUEUE,)).fetchone()
metrics = [line for line in conn.execute("SELECT queue_ext.metrics()").fetchone()[0].splitlines()
           if f'queue="{QUEUE}"' in line and line.startswith("queue_ext_jobs_completed_last_5m")]
print(json.dumps({"submitted": submitted, "order": order, "enqueue_to_done_s": wake_to_done_s,
                  "queue_stats": stats, "metrics": metrics}, default=str))
