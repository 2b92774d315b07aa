"""queue_ext-dashboard against a real cluster, over real HTTP, and in a real browser.

Every page and action, with and without a token, read-only, without the CSRF token, with a
role that may not act; hostile payloads rendered as text; /metrics parsed by prometheus_client
and each value compared with SQL; headless Chromium sees counts change live and retries a
dead job from the page. Screenshots of every page go to tests/screenshots/."""
import datetime
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pgcluster import Cluster, wait_for
from sink import Sink

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "queue_ext-dashboard"
SHOTS = ROOT / "tests" / "screenshots"
PORT = 25452
TOKEN = "dashboard-test-token-0123"
HOSTILE = "<script>alert('pwned')</script>"
HOSTILE_ERROR = '<img src=x onerror="alert(1)">'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    def __init__(self, dsn_url: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(BINARY), "--database-url", dsn_url, "--listen",
                                      f"127.0.0.1:{self.port}", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"dashboard did not start: {self.proc.stdout.read()}")
                time.sleep(0.05)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, allow_redirects=False, timeout=10, **kw)

    def post(self, path: str, data=None, **kw) -> requests.Response:
        return requests.post(self.url + path, data=data, allow_redirects=False, timeout=10, **kw)

    def csrf(self, **kw) -> str:
        page = self.get("/dead", **kw).text
        m = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
        assert m, "the pages carry a CSRF token"
        return m.group(1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster():
    assert BINARY.exists(), f"build the dashboard first: cargo build -p queue_ext-dashboard ({BINARY})"
    c = Cluster("dashboard", PORT, ["queue_ext.http_allowlist = '127.0.0.1'",
                                    "queue_ext.poll_interval = '200ms'"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        for login, role in (("dash_admin", "queue_ext_admin"), ("dash_worker", "queue_ext_worker")):
            conn.execute(f"CREATE ROLE {login} LOGIN")
            conn.execute(f"GRANT {role} TO {login}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.close()


@pytest.fixture(scope="module")
def jobs(cluster, sink):
    """Jobs in every state, a hostile payload and error, a dependency, a webhook delivery."""
    with cluster.connect() as conn:
        q = lambda sql, *a: conn.execute(sql, a).fetchone()
        conn.execute("SELECT queue_ext.create_queue('mail', max_attempts => 2, backoff_base => '1 hour')")
        conn.execute("SELECT queue_ext.create_queue('hooks', webhook_url => %s)", [sink.url + "/hook?sig=SECRETquery"])
        done = q("SELECT queue_ext.enqueue_job('mail', '{\"n\": 1, \"user\": \"ann\"}')")[0]
        job_id, tok = q("SELECT job_id, lease_token FROM queue_ext.get_next_job('mail', 'w1')")
        assert job_id == done
        conn.execute("SELECT queue_ext.complete_job(%s, '{\"sent\": true}', %s)", [done, tok])
        hostile = q("SELECT queue_ext.enqueue_job('mail', jsonb_build_object('html', %s::text, %s::text, 'k'))",
                    HOSTILE, HOSTILE_ERROR)[0]
        job_id, tok = q("SELECT job_id, lease_token FROM queue_ext.get_next_job('mail', 'w1')")
        conn.execute("SELECT queue_ext.fail_job(%s, %s, %s, permanent => true)", [job_id, HOSTILE_ERROR, tok])
        queued = q("SELECT queue_ext.enqueue_job('mail', '{\"n\": 3, \"user\": \"bob\"}')")[0]
        waiting = q("SELECT queue_ext.enqueue_job('mail', '{\"n\": 4}', depends_on => ARRAY[%s]::uuid[])", queued)[0]
        hook = q("SELECT queue_ext.enqueue_job('hooks', '{\"event\": \"ping\"}')")[0]
        wait_for(lambda: conn.execute("SELECT 1 FROM queue_ext.webhook_deliveries WHERE job_id = %s",
                                      [hook]).fetchone(), timeout=20, what="the webhook delivery")
    return {"done": done, "dead": hostile, "queued": queued, "waiting": waiting, "hook": hook}


def url(login: str) -> str:
    return f"postgres://{login}@127.0.0.1:{PORT}/postgres"


@pytest.fixture(scope="module")
def admin(cluster, jobs):
    d = Dashboard(url("dash_admin"))
    yield d
    d.stop()


def sql_counts(cluster) -> dict:
    with cluster.connect() as conn:
        rows = conn.execute("""
            SELECT q.queue_name, s.state,
                   CASE WHEN s.state = 'dead'
                        THEN (SELECT count(*) FROM queue_ext.job_dead_letter d WHERE d.queue_name = q.queue_name)
                        ELSE (SELECT count(*) FROM queue_ext.job_queue j WHERE j.queue_name = q.queue_name
                              AND j.status::text = s.state) END
            FROM queue_ext.queues q,
                 unnest(ARRAY['waiting', 'queued', 'retrying', 'running', 'dead']) AS s(state)""").fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def test_every_page_renders_what_sql_says(cluster, jobs, admin):
    overview = admin.get("/")
    assert overview.status_code == 200
    assert "default-src 'self'" in overview.headers["content-security-policy"]
    counts = sql_counts(cluster)
    for (queue, state), n in counts.items():
        row = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', overview.text).group(1)
        assert f'<td data-k="{state}">{n}</td>' in row, (queue, state, n, row)
    leaks = re.findall(r".{0,150}(?:SECRETquery|/hook\?).{0,30}", overview.text)
    assert not leaks, f"host only, never path or query: {leaks}"
    assert re.search(r"<td>127\.0\.0\.1:\d+</td>", overview.text), "the webhook target host is shown"
    assert 'id="health-status"' in overview.text and "<svg" in overview.text
    assert "<h2>Dispatchers</h2>" in overview.text and "<td>postgres</td><td>yes</td>" in overview.text

    page = admin.get("/queues/mail")
    assert page.status_code == 200
    live_ids = set(re.findall(r'<a href="/jobs/([0-9a-f-]{36})">', page.text))
    assert live_ids == {str(jobs["queued"]), str(jobs["waiting"])}
    completed = admin.get("/queues/mail", params={"state": "completed"}).text
    assert str(jobs["done"]) in completed and str(jobs["queued"]) not in completed
    by_payload = admin.get("/queues/mail", params={"key": "user", "value": "bob"}).text
    assert set(re.findall(r'<a href="/jobs/([0-9a-f-]{36})">', by_payload)) == {str(jobs["queued"])}
    assert admin.get("/queues/nope").status_code == 404
    ids = lambda **p: set(re.findall(r'<a href="/jobs/([0-9a-f-]{36})">', admin.get("/queues/mail", params=p).text))
    assert ids(state="completed", since="2000-01-01") == {str(jobs["done"])}
    assert ids(state="completed", until="2000-01-01") == set()
    assert ids(state="completed", since="2999-01-01 00:00") == set()
    assert admin.get("/queues/mail", params={"since": "yesterday-ish"}).status_code == 400

    done = admin.get(f"/jobs/{jobs['done']}").text
    assert '<span id="state">completed</span>' in done and "&quot;sent&quot;: true" in done
    for step in ("enqueued", "queued", "running", "completed"):
        assert f"<td>{step}</td>" in done, f"history shows {step}"
    waiting = admin.get(f"/jobs/{jobs['waiting']}").text
    assert f'Waits for: <a href="/jobs/{jobs["queued"]}">' in waiting
    queued = admin.get(f"/jobs/{jobs['queued']}").text
    assert f'Needed by: <a href="/jobs/{jobs["waiting"]}">' in queued
    hook = admin.get(f"/jobs/{jobs['hook']}").text
    assert re.search(r"<td>delivered</td><td>200</td>", hook), "the delivery log is shown"
    assert admin.get("/jobs/00000000-0000-7000-8000-000000000000").status_code == 404
    assert admin.get("/jobs/not-a-uuid").status_code == 400

    dead = admin.get("/dead").text
    assert str(jobs["dead"]) in dead
    assert admin.get("/static/app.js").status_code == 200 and admin.get("/static/app.css").status_code == 200


def test_hostile_payloads_render_as_text(jobs, admin):
    for path in (f"/jobs/{jobs['dead']}", "/dead", "/queues/mail?state=dead"):
        body = admin.get(path).text
        assert "<script>alert" not in body and "<img src=x" not in body, path
        assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in body or "&lt;script&gt;" in body, path
        assert "&lt;img src=x onerror=" in body, path
    # Scripts come only from the dashboard itself.
    assert re.findall(r"<script[^>]*>", admin.get(f"/jobs/{jobs['dead']}").text) == \
        ['<script src="/static/app.js" defer>']


def test_api(cluster, jobs, admin):
    queues = admin.get("/api/queues").json()["queues"]
    counts = sql_counts(cluster)
    for q in queues:
        for state in ("waiting", "queued", "retrying", "running", "dead"):
            assert q[state] == counts[(q["queue"], state)]
    job = admin.get(f"/api/jobs/{jobs['done']}").json()
    assert job["state"] == "completed" and job["payload"] == {"n": 1, "user": "ann"} and job["result"] == {"sent": True}
    assert [h["to"] for h in job["history"]] == ["enqueued", "running", "completed"]
    assert admin.get("/api/jobs/00000000-0000-7000-8000-000000000000").status_code == 404

    # Keyset paging walks every job once, newest first.
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('bulk')")
        conn.execute("SELECT queue_ext.enqueue_jobs('bulk', array_agg(jsonb_build_object('i', i))) "
                     "FROM generate_series(1, 120) i")
        want = [str(r[0]) for r in conn.execute(
            "SELECT id FROM queue_ext.job_queue WHERE queue_name = 'bulk' ORDER BY id DESC")]
    seen, before = [], None
    while True:
        page = admin.get("/api/queues/bulk/jobs", params={"before": before} if before else {}).json()
        seen += [j["id"] for j in page["jobs"]]
        before = page["next_before"]
        if not before:
            break
    assert seen == want


def test_actions(cluster, jobs, admin):
    token = admin.csrf()
    with cluster.connect() as conn:
        paused = lambda: conn.execute("SELECT paused FROM queue_ext.queues WHERE queue_name = 'mail'").fetchone()[0]
        r = admin.post("/queues/mail/pause", {"csrf": token})
        assert r.status_code == 303 and paused() is True
        assert "<td data-k=\"paused\">paused</td>" in admin.get("/").text
        assert admin.post("/queues/mail/resume", {"csrf": token}).status_code == 303 and paused() is False
        # Where to go afterwards is a path of ours, never another site or a header.
        for back in ("//evil.example/", "https://evil.example/", "/\r\nSet-Cookie: a=b", "/\u00e9"):
            r = admin.post("/queues/mail/resume", {"csrf": token, "back": back})
            assert r.status_code == 303 and r.headers["location"] == "/", back
        assert admin.post("/queues/mail/resume", {"csrf": token, "back": "/dead"}).headers["location"] == "/dead"

        victim = conn.execute("SELECT queue_ext.enqueue_job('mail', '{\"cancel\": true}')").fetchone()[0]
        assert admin.post(f"/jobs/{victim}/cancel", {"csrf": token}).status_code == 303
        assert conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [victim]).fetchone()[0] == "cancelled"
        # A second cancel is refused by queue_ext (55000), shown as a conflict.
        assert admin.post(f"/jobs/{victim}/cancel", {"csrf": token}).status_code == 409

        many = []
        conn.execute("SELECT queue_ext.create_queue('doomed')")
        for i in range(3):
            conn.execute("SELECT queue_ext.enqueue_job('doomed', jsonb_build_object('doomed', %s::int))", [i])
            jid, tok = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('doomed', 'w')").fetchone()
            conn.execute("SELECT queue_ext.fail_job(%s, 'no', %s, permanent => true)", [jid, tok])
            many.append(str(jid))
        r = admin.post("/dead/retry", [("csrf", token), ("id", many[0]), ("id", many[1])])
        assert r.status_code == 303
        state = lambda j: conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [j]).fetchone()[0]
        assert [state(j) for j in many] == ["queued", "queued", "dead"]
        assert admin.post("/dead/purge", {"csrf": token, "queue": "mail", "older_than": "0 seconds"}).status_code == 303
        assert conn.execute("SELECT count(*) FROM queue_ext.job_dead_letter WHERE queue_name = 'mail'").fetchone()[0] == 0
        # Limits, through set_rate_limit and set_concurrency_limit.
        assert admin.post("/limits", {"csrf": token, "kind": "rate", "key": "tenant-1", "max": "5",
                                      "per": "10 seconds", "burst": "2"}).status_code == 303
        assert conn.execute("SELECT max_jobs, per, burst FROM queue_ext.rate_limits WHERE key = 'tenant-1'").fetchone() \
            == (5, datetime.timedelta(seconds=10), 2)
        assert admin.post("/limits", {"csrf": token, "kind": "concurrency", "key": "acct-9", "max": "3"}).status_code == 303
        assert conn.execute("SELECT max_running FROM queue_ext.concurrency_limits WHERE key = 'acct-9'").fetchone() == (3,)
        assert "<td>tenant-1</td><td>5</td><td>00:00:10</td><td>2</td>" in admin.get("/").text
        assert admin.post("/limits", {"csrf": token, "kind": "rate", "key": "k", "max": "many"}).status_code == 400
        assert admin.post("/limits", {"csrf": token, "kind": "rate", "key": "k", "max": "0"}).status_code == 400

        # A hostile dead letter again, for the browser test.
        conn.execute("SELECT queue_ext.create_queue('spam')")
        jobs["dead"] = conn.execute("SELECT queue_ext.enqueue_job('spam', jsonb_build_object('html', %s::text))",
                                    [HOSTILE]).fetchone()[0]
        jid, tok = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('spam', 'w')").fetchone()
        assert jid == jobs["dead"]
        conn.execute("SELECT queue_ext.fail_job(%s, %s, %s, permanent => true)", [jid, HOSTILE_ERROR, tok])


def test_csrf_refused(cluster, admin):
    with cluster.connect() as conn:
        for data in ({}, {"csrf": "0" * 64}, {"csrf": ""}):
            r = admin.post("/queues/mail/pause", data)
            assert r.status_code == 403 and "CSRF" in r.text, data
        assert conn.execute("SELECT paused FROM queue_ext.queues WHERE queue_name = 'mail'").fetchone()[0] is False
    # A foreign Host (a DNS-rebound name) is refused without a token.
    assert admin.get("/", headers={"Host": "attacker.example"}).status_code == 403


def test_read_only_hides_and_refuses(cluster, jobs, admin):
    ro = Dashboard(url("dash_admin"), "--read-only")
    try:
        page = ro.get("/").text
        assert 'id="read-only"' in page and 'action="/queues/mail/pause"' not in page
        dead = ro.get("/dead").text
        assert "retry-one" not in dead and 'action="/dead/purge"' not in dead
        token = admin.csrf()  # a real token from the other process: still refused
        assert 'id="set-limit"' not in page
        for path in ("/queues/mail/pause", f"/jobs/{jobs['dead']}/retry", "/dead/purge", "/limits"):
            r = ro.post(path, {"csrf": token})
            assert r.status_code == 403 and "read-only" in r.text, path
        with cluster.connect() as conn:
            assert conn.execute("SELECT paused FROM queue_ext.queues WHERE queue_name = 'mail'").fetchone()[0] is False
    finally:
        ro.stop()


def test_worker_role_cannot_act(cluster, jobs):
    """The dashboard acts with its database role's rights: queue_ext refuses a worker (42501)."""
    d = Dashboard(url("dash_worker"))
    try:
        assert d.get("/").status_code == 200
        r = d.post("/queues/mail/pause", {"csrf": d.csrf()})
        assert r.status_code == 403 and "42501" in r.text
    finally:
        d.stop()


def test_token_auth(cluster, jobs):
    d = Dashboard(url("dash_admin"), "--token", TOKEN)
    try:
        assert d.get("/", headers={"Accept": "text/html"}).headers.get("location") == "/login"
        assert d.get("/api/queues").status_code == 401
        assert d.get("/metrics", headers={"Authorization": "Bearer wrong-token-xx"}).status_code == 401
        assert d.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        login = d.get("/login").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', login).group(1)
        assert d.post("/login", {"csrf": csrf, "token": "nope-nope"}).status_code == 401
        r = d.post("/login", {"csrf": csrf, "token": TOKEN})
        assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        cookies = {"queue_ext_session": r.cookies["queue_ext_session"]}
        assert d.get("/", cookies=cookies).status_code == 200
        assert d.get("/", cookies={"queue_ext_session": "f" * 64}).status_code == 401
        # Logged in, actions still need the CSRF token, which the public login page does not show.
        action_csrf = d.csrf(cookies=cookies)
        assert action_csrf != csrf
        assert d.post("/queues/mail/pause", {}, cookies=cookies).status_code == 403
        assert d.post("/queues/mail/pause", {"csrf": csrf}, cookies=cookies).status_code == 403
        assert d.post("/logout", {"csrf": action_csrf}, cookies=cookies).status_code == 303
        assert d.get("/api/queues", cookies=cookies).status_code == 401
    finally:
        d.stop()
    # Off loopback only with a token.
    out = subprocess.run([str(BINARY), "--database-url", url("dash_admin"), "--listen", "0.0.0.0:0"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and "without --token" in out.stderr


def test_metrics_match_sql(cluster, jobs, admin):
    text = admin.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    samples = lambda name: {tuple(sorted(s.labels.items())): s.value
                            for f in families.values() for s in f.samples if s.name == name}
    with cluster.connect() as conn:
        jobs_gauge = samples("queue_ext_jobs")
        for (queue, state), n in sql_counts(cluster).items():
            assert jobs_gauge[(("queue", queue), ("state", state))] == n, (queue, state)
        one = lambda sql, *a: conn.execute(sql, a).fetchone()[0]
        for queue in ("mail", "hooks", "bulk"):
            key = (("queue", queue),)
            assert samples("queue_ext_jobs_completed_last_5m")[key] == one(
                "SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed' "
                "AND finished_at > now() - interval '5 minutes'", queue)
            assert samples("queue_ext_jobs_dead_last_5m")[key] == one(
                "SELECT count(*) FROM queue_ext.job_dead_letter WHERE queue_name = %s "
                "AND died_at > now() - interval '5 minutes'", queue)
            assert samples("queue_ext_jobs_failed_last_5m")[key] == one(
                "SELECT count(*) FROM queue_ext.job_status_history WHERE queue_name = %s AND from_status = 'running' "
                "AND to_status IN ('retrying', 'dead') AND at > now() - interval '5 minutes'", queue)
            assert samples("queue_ext_job_wait_seconds_count")[key] == one(
                "SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s AND started_at IS NOT NULL "
                "AND finished_at > now() - interval '5 minutes'", queue)
            assert samples("queue_ext_job_run_seconds_count")[key] == samples("queue_ext_jobs_completed_last_5m")[key]
            assert samples("queue_ext_queue_paused")[key] == 0
            oldest = one("SELECT coalesce(extract(epoch FROM now() - min(run_at)), 0)::float8 FROM queue_ext.job_queue "
                         "WHERE queue_name = %s AND status IN ('queued', 'retrying') AND run_at <= now()", queue)
            assert abs(samples("queue_ext_oldest_queued_job_age_seconds")[key] - oldest) < 5
        # The bulk queue's 120 queued jobs are the oldest there.
        assert samples("queue_ext_oldest_queued_job_age_seconds")[(("queue", "bulk"),)] > 0
        assert samples("queue_ext_jobs_failed_last_5m")[(("queue", "doomed"),)] == 3
        buckets = sorted((float(dict(k)["le"]), v) for k, v in samples("queue_ext_job_run_seconds_bucket").items()
                         if dict(k)["queue"] == "mail")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative buckets"
        assert buckets[-1] == (float("inf"), 1), "the one completed mail job"
        for outcome in ("delivered", "retry", "failed", "stale"):
            assert samples("queue_ext_webhook_deliveries_last_5m")[(("outcome", outcome), ("queue", "hooks"))] == one(
                "SELECT count(*) FROM queue_ext.webhook_deliveries WHERE queue_name = 'hooks' AND outcome = %s "
                "AND delivered_at > now() - interval '5 minutes'", outcome)
        assert samples("queue_ext_webhook_delivery_seconds_count")[(("queue", "hooks"),)] >= 1
        ups = samples("queue_ext_dispatcher_up")
        for db, running in conn.execute("SELECT database, running FROM queue_ext.dispatcher_status()"):
            assert ups[(("database", db),)] == (1 if running else 0)
        assert ups[(("database", "postgres"),)] == 1
        delivered = samples("queue_ext_dispatcher_deliveries_total")[(("database", "postgres"), ("outcome", "delivered"))]
        assert delivered == one("SELECT delivered FROM queue_ext.dispatcher_status() WHERE database = 'postgres'")
        assert families["queue_ext_dispatcher_deliveries"].type == "counter"
        assert families["queue_ext_job_wait_seconds"].type == "histogram"
        # The same text from SQL, for any SQL-speaking scraper (ages move with the clock).
        from_sql = one("SELECT queue_ext.metrics()")
        strip = lambda t: [l for l in t.splitlines() if "oldest_queued" not in l]
        assert strip(from_sql) == strip(admin.get("/metrics").text)
        # Producers may not read it; workers may.
        conn.execute("CREATE ROLE dash_producer LOGIN IN ROLE queue_ext_producer")
    with psycopg.connect(f"host=127.0.0.1 port={PORT} user=dash_producer dbname=postgres") as p:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute("SELECT queue_ext.metrics()")
    with psycopg.connect(f"host=127.0.0.1 port={PORT} user=dash_worker dbname=postgres") as w:
        assert "queue_ext_jobs{" in w.execute("SELECT queue_ext.metrics()").fetchone()[0]


def test_metric_bucket_math(cluster, jobs):
    """Histogram buckets are cumulative and sum to the count, for a run time set in SQL."""
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('timed')")
        conn.execute("""INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                               enqueued_by, created_at, run_at, started_at, finished_at)
                        SELECT gen_random_uuid(), 'timed', '{}', 'normal', 'completed', 1, 5, 'postgres',
                               now() - interval '1 minute', now() - interval '1 minute',
                               now() - make_interval(secs => s), now()
                        FROM unnest(ARRAY[0.001, 0.02, 0.3, 0.3, 7, 40]) AS s""")
        text = conn.execute("SELECT queue_ext.metrics()").fetchone()[0]
    got = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "queue_ext_job_run_seconds_bucket" and s.labels["queue"] == "timed":
                got[s.labels["le"]] = s.value
    assert got["0.005"] == 1 and got["0.025"] == 2 and got["0.5"] == 4 and got["10"] == 5 and got["60"] == 6
    assert got["+Inf"] == 6


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def test_browser_live_counts_retry_and_screenshots(cluster, jobs, admin, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    SHOTS.mkdir(exist_ok=True)
    cell = lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="mail"] td[data-k="queued"]').text

    t0 = time.time()
    browser.get(admin.url + "/")
    print(f"\noverview loaded in {time.time() - t0:.2f} s")
    WebDriverWait(browser, 5).until(lambda b: b.find_element(By.ID, "live").text.startswith("live"))
    before = int(cell())
    browser.execute_script("window.notReloaded = true")
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.enqueue_job('mail', '{\"from\": \"the browser test\"}')")
        want = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = 'mail' "
                            "AND status = 'queued'").fetchone()[0]
    assert want == before + 1
    t0 = time.time()
    WebDriverWait(browser, 2).until(lambda b: cell() == str(want))
    print(f"count changed on the page {time.time() - t0:.2f} s after the enqueue committed")
    assert browser.execute_script("return window.notReloaded === true"), "the page was not reloaded"

    # The charts follow too: a completion shows in the last-hour chart without a reload.
    from selenium.common.exceptions import StaleElementReferenceException
    caption = lambda: browser.find_element(By.CSS_SELECTOR, '[data-chart="overview"] figcaption').text
    total = lambda: int(re.search(r"\((\d+) in all\)", caption()).group(1))
    # The chart element is swapped while the page lives: read it again if it went stale.
    done_before = WebDriverWait(browser, 3, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda b: [total()])[0]
    with cluster.connect() as conn:
        job, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('mail')").fetchone()
        conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
    t0 = time.time()
    WebDriverWait(browser, 3, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda b: total() == done_before + 1)
    print(f"chart changed on the page {time.time() - t0:.2f} s after the completion committed")
    assert browser.execute_script("return window.notReloaded === true"), "the page was not reloaded"
    browser.save_screenshot(str(SHOTS / "overview.png"))

    # A queue's first page follows new jobs without a reload too.
    browser.get(admin.url + "/queues/mail")
    WebDriverWait(browser, 5).until(lambda b: b.find_element(By.ID, "live").text.startswith("live"))
    browser.execute_script("window.notReloaded = true")
    with cluster.connect() as conn:
        new = str(conn.execute("SELECT queue_ext.enqueue_job('mail', '{\"<b>\": \"listed live\"}')").fetchone()[0])
    WebDriverWait(browser, 2).until(lambda b: new in b.find_element(By.ID, "jobs").text)
    assert browser.execute_script("return window.notReloaded === true")
    assert '{"<b>": "listed live"}' in browser.find_element(By.ID, "jobs").text, "inserted as text"

    for name, path in (("queue", "/queues/mail"), ("job", f"/jobs/{jobs['done']}"),
                       ("job-hostile", f"/jobs/{jobs['dead']}"), ("dead", "/dead")):
        browser.get(admin.url + path)
        browser.save_screenshot(str(SHOTS / f"{name}.png"))
    # The hostile payload is text in the page, not a script that ran.
    assert browser.execute_script("return window.pwned === undefined")
    browser.get(admin.url + f"/jobs/{jobs['dead']}")
    assert HOSTILE in browser.find_element(By.ID, "payload").text

    # Retry a dead job from the dead letter page, confirming the dialog.
    browser.get(admin.url + "/dead")
    dead_id = str(jobs["dead"])
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{dead_id}"] button.retry-one').click()
    WebDriverWait(browser, 5).until(lambda b: b.switch_to.alert).accept()
    WebDriverWait(browser, 5).until(lambda b: dead_id not in b.page_source)
    with cluster.connect() as conn:
        assert conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [dead_id]).fetchone()[0] == "queued"
