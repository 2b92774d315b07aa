"""The queue_ext demo: jobs claimed by two SQL workers, then webhook jobs delivered by the
background dispatcher to a local receiver. Run through scripts/demo.sh."""
import sys
import threading
import time

import psycopg

dsn = sys.argv[1]
receiver = sys.argv[2]
secret = sys.argv[3]


def sql(conn, query, *args):
    return conn.execute(query, args).fetchall()


def show(conn, title, query):
    cur = conn.execute(query)
    cols = [c.name for c in cur.description]
    rows = cur.fetchall()
    print(f"\n{title}")
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  " + "-+-".join("-" * w for w in widths))
    for r in rows:
        print("  " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)))


with psycopg.connect(dsn, autocommit=True) as conn:
    print("1. A queue for emails, drained by SQL workers (any client can be a worker).")
    sql(conn, "SELECT queue_ext.create_queue('emails', max_attempts => 3)")
    for i in range(1, 11):
        prio = "critical" if i % 5 == 0 else "normal"
        sql(conn, "SELECT queue_ext.enqueue_job('emails', %s::jsonb, priority => %s)",
            f'{{"to": "user{i}@example.com"}}', prio)
    print("   enqueued 10 jobs (2 critical)")

    def worker(name):
        with psycopg.connect(dsn, autocommit=True) as w:
            while True:
                job = w.execute("SELECT job_id, payload, priority, lease_token FROM queue_ext.get_next_job('emails', %s)",
                                (name,)).fetchone()
                if job is None:
                    return
                job_id, payload, priority, token = job
                print(f"   {name} claimed {payload['to']:<20} ({priority})", flush=True)
                time.sleep(0.05)  # the "work"
                w.execute("SELECT queue_ext.complete_job(%s, '{\"sent\": true}', lease_token => %s)", (job_id, token))

    threads = [threading.Thread(target=worker, args=(f"worker-{n}",)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    show(conn, "   who did what (job_status_history):",
         "SELECT worker_id, count(*) AS completed FROM queue_ext.job_status_history "
         "WHERE queue_name = 'emails' AND to_status = 'completed' GROUP BY 1 ORDER BY 1")

    print("\n2. A webhook queue: the background dispatcher POSTs each job, signed, as it commits.")
    sql(conn, "SELECT queue_ext.create_queue('signups', webhook_url => %s, webhook_secret => %s, callback_url => %s)",
        f"{receiver}/hooks/signup", secret, f"{receiver}/callbacks")
    t0 = time.time()
    for i in range(1, 6):
        sql(conn, "SELECT queue_ext.enqueue_job('signups', %s::jsonb)", f'{{"user_id": {i}}}')
    deadline = time.time() + 15
    while time.time() < deadline:
        left = sql(conn, "SELECT count(*) FROM queue_ext.job_queue")[0][0]
        if left == 0:
            break
        time.sleep(0.05)
    print(f"   all webhooks and completion callbacks delivered in {time.time() - t0:.2f}s")
    show(conn, "   delivery log (queue_ext.webhook_deliveries):",
         "SELECT queue_name, outcome, status_code, round(duration_ms::numeric, 1) AS ms "
         "FROM queue_ext.webhook_deliveries ORDER BY id")
    show(conn, "3. Queue stats (queue_ext.queue_stats()):",
         "SELECT queue_name, queued, running, dead, completed_last_hour FROM queue_ext.queue_stats()")
    show(conn, "4. The dispatcher (queue_ext.dispatcher_status()):",
         "SELECT database, state, delivered, retried, failed FROM queue_ext.dispatcher_status()")
