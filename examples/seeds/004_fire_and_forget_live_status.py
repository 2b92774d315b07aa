"""Fire and forget: submit a job, get its id back at once, watch its status change live, and
find its result in your own table.

By hand: submit_job() inserts a pending row into job_results and sends a pgmq message; a
pg_net trigger POSTs it to Trigger.dev; the task updates job_results; Supabase Realtime pushes
the change to the browser.
With queue_ext: submit_job() inserts the row and enqueues in one transaction (both or
neither); a worker writes the result row and completes the job in one transaction (a crash
leaves neither, and the job is retried); a queue with notify_events => true publishes every
transition on queue_ext_events, which any client can LISTEN to.

    DATABASE_URL=... python3 004_fire_and_forget_live_status.py
"""
import json
import os
import time

import psycopg

SETUP = [
    "SELECT queue_ext.create_queue('work_queue', if_not_exists => true, notify_events => true)",
    """CREATE TABLE IF NOT EXISTS job_results (
           job_id uuid PRIMARY KEY, task_name text NOT NULL, status text NOT NULL DEFAULT 'pending',
           result text, created_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE OR REPLACE FUNCTION submit_job(task_name text) RETURNS uuid LANGUAGE plpgsql AS $$
       DECLARE id uuid := queue_ext.enqueue_job('work_queue', jsonb_build_object('task_name', task_name));
       BEGIN
           INSERT INTO job_results (job_id, task_name) VALUES (id, task_name);
           RETURN id;
       END $$""",
]
dsn = os.environ["DATABASE_URL"]
conn = psycopg.connect(dsn, autocommit=True)
for statement in SETUP:
    conn.execute(statement)

# The UI's live view: every transition of every job, as it commits.
ui = psycopg.connect(dsn, autocommit=True)
ui.execute("LISTEN queue_ext_events")

# The frontend: fire and forget.
jobs = [str(conn.execute("SELECT submit_job(%s)", (f"Test Job #{n}",)).fetchone()[0]) for n in (1, 2)]
# A submit that fails after the enqueue leaves no row and no job.
with conn.transaction(force_rollback=True):
    lost = str(conn.execute("SELECT submit_job('rolled back')").fetchone()[0])

# The background worker: the result row and the completion commit together.
worker = psycopg.connect(dsn)
while True:
    with worker.transaction():
        row = worker.execute("SELECT job_id, payload->>'task_name', lease_token "
                             "FROM queue_ext.get_next_job('work_queue', 'task-runner')").fetchone()
    if row is None:
        break
    job_id, task, token = row
    started = time.monotonic()
    time.sleep(0.2)  # the task itself
    with worker.transaction():
        worker.execute("UPDATE job_results SET status = 'completed', result = %s WHERE job_id = %s",
                       (f'Task "{task}" completed after {time.monotonic() - started:.1f} s', job_id))
        worker.execute("SELECT queue_ext.complete_job(%s, lease_token => %s)", (job_id, token))

live = {j: [] for j in jobs}
for note in ui.notifies(timeout=1.0):
    event = json.loads(note.payload)
    if event["id"] in live:
        live[event["id"]].append(event["status"])
results = dict(conn.execute("SELECT job_id::text, status FROM job_results WHERE job_id = ANY(%s::uuid[])",
                            (jobs + [lost],)).fetchall())
lost_job = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE id = %s", (lost,)).fetchone()[0]
print(json.dumps({"jobs": jobs, "live": live, "results": results, "rolled_back_jobs": lost_job}))
