"""A file upload creates a job; a worker processes it; a view shows each file's status.

By hand: an INSERT into ingest_files fires a trigger that inserts into a jobs table; pg_cron
calls a cron-tick Edge Function every minute, which calls worker-pull, which takes one job,
processes it and sets its status to done or failed.
With queue_ext: the trigger enqueues a job and keeps its id on the row; the queue is a webhook
queue whose URL is the worker endpoint; where the dispatcher is not preloaded (a managed
database), pg_cron runs queue_ext.process_jobs(), which delivers the due jobs and records each
outcome with retries and a dead letter queue; the status view reads queue_ext.job_status().

    DATABASE_URL=postgresql://.../uploads CRON_DATABASE_URL=postgresql://.../postgres \\
        ENDPOINT_URL=http://127.0.0.1:8000 WEBHOOK_SECRET=whsec_... python3 001_upload_trigger_worker_status.py
"""
import json
import os

import psycopg

SETUP = [
    """SELECT queue_ext.create_queue('ingest', if_not_exists => true, max_attempts => 3,
           webhook_url => %(url)s, webhook_secret => %(secret)s)""",
    """CREATE TABLE IF NOT EXISTS ingest_files (
           id bigserial PRIMARY KEY, path text NOT NULL, uploaded_at timestamptz NOT NULL DEFAULT now(),
           job_id uuid)""",
    """CREATE OR REPLACE FUNCTION ingest_files_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           NEW.job_id := queue_ext.enqueue_job('ingest', jsonb_build_object('path', NEW.path));
           RETURN NEW;
       END $$""",
    """CREATE OR REPLACE TRIGGER ingest_files_enqueue BEFORE INSERT ON ingest_files
           FOR EACH ROW EXECUTE FUNCTION ingest_files_enqueue()""",
    """CREATE OR REPLACE VIEW job_processing_status AS
       SELECT f.id, f.path, s.status::text AS status, s.attempt, s.last_error, s.finished_at
       FROM ingest_files AS f CROSS JOIN LATERAL queue_ext.job_status(f.job_id) AS s""",
]
TICK = "SELECT job_id, outcome, status_code FROM queue_ext.process_jobs('ingest', 5)"

dsn = os.environ["DATABASE_URL"]
with psycopg.connect(dsn, autocommit=True) as conn:
    for statement in SETUP:
        conn.execute(statement, {"url": os.environ["ENDPOINT_URL"] + "/functions/v1/worker-pull",
                                 "secret": os.environ["WEBHOOK_SECRET"]} if "%(" in statement else None)
    database = conn.info.dbname
    # pg_cron lives in one database (cron.database_name) and runs jobs in any.
    with psycopg.connect(os.environ.get("CRON_DATABASE_URL", dsn), autocommit=True) as cron:
        cron.execute("SELECT cron.schedule_in_database('process-queued-jobs', '* * * * *', %s, %s)",
                     (TICK.replace("job_id, outcome, status_code", "count(*)"), database))

    # An upload is a row; its job exists as soon as the row does.
    for path in ("uploads/a.pdf", "uploads/b.csv"):
        conn.execute("INSERT INTO ingest_files (path) VALUES (%s)", (path,))
    before = conn.execute("SELECT path, status FROM job_processing_status ORDER BY id").fetchall()
    # What pg_cron runs every minute, run once now.
    tick = conn.execute(TICK).fetchall()
    after = conn.execute("SELECT path, status, attempt FROM job_processing_status ORDER BY id").fetchall()
    print(json.dumps({"before": before, "tick": [[str(j), o, c] for j, o, c in tick], "after": after}))
