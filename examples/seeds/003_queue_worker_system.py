"""A job system with priorities, dependencies, rate limits, batches, progress, health and
row level security.

By hand: job tables, SKIP LOCKED claims, retry and dead letter logic, a rate limiter, a
progress column and health checks, all written and maintained in the application.
With queue_ext each of those is one call; this script exercises each and prints what it saw.

    DATABASE_URL=... python3 003_queue_worker_system.py     (a superuser: it creates two roles)
"""
import json
import os

import psycopg
from psycopg.types.json import Jsonb

conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
sql = lambda q, *a: conn.execute(q, a)  # noqa: E731
for q in ("email", "audio", "payout", "analytics"):
    sql("SELECT queue_ext.create_queue(%s, if_not_exists => true, max_attempts => 3)", q)
out = {}

# Priorities: critical > high > normal > low, then oldest first.
for kind, priority in [("newsletter", "low"), ("welcome", "normal"), ("password_reset", "critical")]:
    sql("SELECT queue_ext.enqueue_job('email', %s, priority => %s)", Jsonb({"kind": kind}), priority)
claimed = sql("SELECT job_id, payload->>'kind' FROM queue_ext.get_next_jobs('email', 3, 'w1')").fetchall()
out["priority_order"] = [kind for _, kind in claimed]
sql("SELECT queue_ext.complete_jobs(%s)", [job_id for job_id, _ in claimed])

# Dependencies: publish waits until render has completed.
render = sql("SELECT queue_ext.enqueue_job('audio', '{\"step\": \"render\"}')").fetchone()[0]
publish = sql("SELECT queue_ext.enqueue_job('audio', '{\"step\": \"publish\"}', depends_on => ARRAY[%s]::uuid[])",
              render).fetchone()[0]
state = lambda job: sql("SELECT status::text FROM queue_ext.job_status(%s)", job).fetchone()[0]  # noqa: E731
out["publish_before"] = state(publish)
job = sql("SELECT job_id, lease_token FROM queue_ext.get_next_job('audio', 'w1')").fetchone()
# Progress: a long render reports how far it got (and extends its lease).
sql("SELECT queue_ext.update_progress(%s, 60, '{\"stage\": \"mixing\"}', lease_token => %s)", *job)
out["render_progress"] = sql("SELECT progress FROM queue_ext.job_status(%s)", render).fetchone()[0]
sql("SELECT queue_ext.complete_job(%s, lease_token => %s)", *job)
out["publish_after"] = state(publish)

# Rate limit: payouts go to the bank API at most 5 per minute, however many workers claim.
sql("SELECT queue_ext.set_rate_limit('bank-api', 5, '1 minute')")
sql("SELECT count(*) FROM queue_ext.enqueue_jobs('payout', array_fill('{}'::jsonb, ARRAY[8]), rate_limit_key => 'bank-api')")
out["payouts_claimable_now"] = len(sql("SELECT * FROM queue_ext.get_next_jobs('payout', 8, 'w1')").fetchall())

# Batches: 200 analytics events enqueued in one statement, claimed and completed 100 at a time.
sql("SELECT count(*) FROM queue_ext.enqueue_jobs('analytics', "
    "(SELECT array_agg(jsonb_build_object('event', n)) FROM generate_series(1, 200) AS n))")
batches = []
while batch := sql("SELECT job_id, lease_token FROM queue_ext.get_next_jobs('analytics', 100, 'w1')").fetchall():
    sql("SELECT count(*) FROM queue_ext.complete_jobs(%s, %s)", [j for j, _ in batch], [t for _, t in batch])
    batches.append(len(batch))
out["analytics_batches"] = batches

# Retries and the dead letter queue: three failures and the job is kept for review.
bad = sql("SELECT queue_ext.enqueue_job('email', '{\"kind\": \"bounce\"}', max_attempts => 1)").fetchone()[0]
job = sql("SELECT job_id, lease_token FROM queue_ext.get_next_job('email', 'w1')").fetchone()
sql("SELECT queue_ext.fail_job(%s, 'mailbox does not exist', lease_token => %s)", *job)
out["bounce_dead_reason"] = sql("SELECT last_error FROM queue_ext.job_dead_letter WHERE id = %s", bad).fetchone()[0]

# Health: one JSON document for a probe or a dashboard.
out["health"] = sql("SELECT queue_ext.health()->>'status'").fetchone()[0]

# Row level security: a producer role sees only the jobs it enqueued.
for role in ("mindscript_app_a", "mindscript_app_b"):
    sql(f"DO $$BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
    sql(f"GRANT queue_ext_producer TO {role}")
    sql(f"SET ROLE {role}")
    sql("SELECT queue_ext.enqueue_job('email', %s)", Jsonb({"from": role}))
    sql("RESET ROLE")
sql("SET ROLE mindscript_app_a")
out["app_a_sees"] = sorted({r[0] for r in sql("SELECT payload->>'from' FROM queue_ext.job_queue")})
sql("RESET ROLE")
print(json.dumps(out))
