"""Database webhooks on INSERT, with custom headers and a cron fallback.

By hand: a dashboard webhook per table POSTs each new row to an Edge Function with an
Authorization header, and pg_cron runs every minute to catch what the webhook missed.
With queue_ext: an AFTER INSERT trigger enqueues each row into a webhook queue; the
dispatcher POSTs it as soon as the INSERT commits, with the queue's headers, signed
(Standard Webhooks), retried with backoff when the endpoint fails. The cron fallback is
process_jobs(), for a database where the dispatcher is not preloaded.

    DATABASE_URL=... ENDPOINT_URL=http://127.0.0.1:8000 WEBHOOK_SECRET=whsec_... \\
        python3 000_database_webhooks_on_insert.py
"""
import json
import os
import time

import psycopg

SETUP = [
    "CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, prompt text NOT NULL, storyboard_id text)",
    """SELECT queue_ext.create_queue(%(queue)s, if_not_exists => true,
           webhook_url => %(url)s, webhook_secret => %(secret)s,
           webhook_headers => jsonb_build_object('Authorization', 'Bearer ' || %(token)s))""",
    """CREATE OR REPLACE TRIGGER {table}_webhook AFTER INSERT ON {table}
           FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger('{queue}')""",
    # The fallback: delivers anything due from SQL (the dispatcher does it at once when preloaded).
    """SELECT cron.schedule('{queue}-fallback', '* * * * *',
           $$SELECT count(*) FROM queue_ext.process_jobs('{queue}', 50)$$)""",
]
HOOKS = {"image_generation_requests": "process-image-generation",
         "video_generation_requests": "process-video-generation"}

with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
    for table, queue in HOOKS.items():
        params = {"queue": queue, "url": f"{os.environ['ENDPOINT_URL']}/functions/v1/{queue}",
                  "secret": os.environ["WEBHOOK_SECRET"], "token": os.environ.get("SERVICE_ROLE_KEY", "service-role-key")}
        for statement in SETUP:
            conn.execute(statement.format(table=table, queue=queue), params if "%(" in statement else None)
    # The application only inserts rows; each INSERT is a delivery once it commits.
    with conn.transaction():
        for n in range(3):
            conn.execute("INSERT INTO image_generation_requests (prompt, storyboard_id) VALUES (%s, 'sb-1')", (f"scene {n}",))
        conn.execute("INSERT INTO video_generation_requests (prompt) VALUES ('trailer')")
    deadline = time.time() + 30
    while conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = ANY(%s)",
                       (list(HOOKS.values()),)).fetchone()[0] and time.time() < deadline:
        time.sleep(0.1)
    delivered = dict(conn.execute(
        "SELECT queue_name, count(*) FROM queue_ext.webhook_deliveries WHERE queue_name = ANY(%s) "
        "AND outcome = 'delivered' GROUP BY 1", (list(HOOKS.values()),)).fetchall())
    print(json.dumps({"delivered": delivered}))
