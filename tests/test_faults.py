"""Fault injection over real HTTP on loopback: endpoints that answer NUL bytes, invalid UTF-8,
50 MB, redirects to private addresses, accept and never answer, reset mid-body, trickle a
byte a second, fail, or refuse the connection.

For each: the attempts the endpoint counted, the job's final state and its error (which never
names the URL or its query), the dispatcher's pid unchanged (it survived), and another queue
delivering while the fault is under way."""
import itertools
import socket
import threading
import time

import pytest

from hostile_server import BAD_UTF8_BODY, HUGE_BYTES, NUL_BODY, HostileServer
from pgcluster import Cluster, dispatcher_pid, wait_for

PORT = 25530
HTTP_TIMEOUT_S = 2
RESPONSE_MAX_BYTES = 65536
_names = itertools.count()


@pytest.fixture(scope="module")
def server():
    s = HostileServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("faults", PORT, [
        "queue_ext.http_allowlist = '127.0.0.1/32'",
        f"queue_ext.http_timeout = '{HTTP_TIMEOUT_S}s'",
        "queue_ext.poll_interval = '200ms'",
        "queue_ext.response_max_bytes = '64kB'",
        "queue_ext.shutdown_grace = '2s'",
    ])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        wait_for(lambda: dispatcher_pid(conn), 15, what="the dispatcher to start")
    yield c
    c.stop()


@pytest.fixture
def conn(cluster):
    with cluster.connect() as c:
        yield c


@pytest.fixture(scope="module")
def control(cluster, server):
    """A well-behaved queue: it must keep delivering whatever the other endpoints do."""
    with cluster.connect() as conn:
        name, path, _ = hook_queue(conn, server, "ok")
    return name, path


class Hook:
    def __init__(self, name, path, url, token):
        self.name, self.path, self.url, self.token = name, path, url, token


def hook_queue(conn, server, kind, **settings):
    """A webhook queue pointing at /<kind>/<queue>?token=<secret>: its own path on the server,
    and a credential in the query that must never show up in an error text."""
    name = f"f{next(_names)}_{kind.replace('-', '_')}"
    path = f"/{kind}/{name}"
    token = f"sekrit-{name}"
    url = f"{server.url}{path}?token={token}"
    args = {"webhook_url": url, "backoff_base": "200 milliseconds", "backoff_cap": "1 second",
            "max_attempts": 3, **settings}
    named = ", ".join(f"{k} => %s" for k in args)
    conn.execute(f"SELECT queue_ext.create_queue(%s, {named})", [name, *args.values()])
    return name, path, Hook(name, path, url, token)


def enqueue(conn, queue, payload="{}"):
    return conn.execute("SELECT queue_ext.enqueue_job(%s, %s::jsonb)", [queue, payload]).fetchone()[0]


def status(conn, job):
    return conn.execute("SELECT status::text, attempt, last_error, result FROM queue_ext.job_status(%s)",
                        [job]).fetchone()


def wait_status(conn, job, wanted, timeout=20):
    try:
        return wait_for(lambda: (s := status(conn, job))[0] in wanted and s, timeout, what=f"{job} {wanted}")
    except AssertionError as e:
        raise AssertionError(f"{e}; job is now {status(conn, job)}") from None


def deliveries(conn, job):
    return conn.execute("SELECT outcome, status_code, error, url, response_body FROM queue_ext.webhook_deliveries "
                        "WHERE job_id = %s ORDER BY id", [job]).fetchall()


def others_still_deliver(conn, server, control):
    """A job of the well-behaved queue, enqueued now, is delivered and completed."""
    name, path = control
    before = server.attempts(path)
    job = enqueue(conn, name)
    wait_status(conn, job, {"completed"}, timeout=10)
    assert server.attempts(path) == before + 1
    assert f"msg_{job}" in server.webhook_ids(path)


def check_no_leak(conn, hook, job, last_error):
    """Error texts never carry the URL, its path or its query; the log's url is redacted."""
    texts = [last_error or ""] + [d[2] or "" for d in deliveries(conn, job)]
    for text in texts:
        assert hook.token not in text, f"the query's secret leaked into an error: {text!r}"
        assert hook.path not in text, f"the URL leaked into an error: {text!r}"
    redacted = hook.url.replace(hook.token, "REDACTED")
    urls = {d[3] for d in deliveries(conn, job)}
    assert urls == {redacted}, f"webhook_deliveries.url should be the redacted URL, got {urls}"


def stays(predicate, seconds, what):
    """Asserts predicate() holds throughout `seconds` (for 'never again' claims)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert predicate(), what
        time.sleep(0.1)


def test_nul_bytes_in_the_body_are_delivered_once(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "nul", max_attempts=5)
    job = enqueue(conn, name)
    wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /nul")
    others_still_deliver(conn, server, control)
    done = wait_status(conn, job, {"completed", "dead"}, timeout=15)
    assert done[0] == "completed", f"a 200 with NUL bytes is a delivery: {done}"
    assert done[1] == 1 and done[3]["status"] == 200
    body = done[3]["body"]
    assert "\x00" not in body and body.startswith('{"note": "nul follows"}'), repr(body)
    assert len(body) >= len(NUL_BODY) - 3, "NUL bytes replaced, not the body dropped"
    assert [(d[0], d[1]) for d in deliveries(conn, job)] == [("delivered", 200)]
    # Sent once, never looped by a crash-and-requeue cycle.
    stays(lambda: server.attempts(path) == 1, 3, "the NUL endpoint was sent the job again")
    assert server.webhook_ids(path) == [f"msg_{job}"]
    check_no_leak(conn, hook, job, done[2])
    assert dispatcher_pid(conn) == pid, "the dispatcher was replaced: it died on the body"


def test_invalid_utf8_body_is_delivered_once(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "badutf8")
    job = enqueue(conn, name)
    wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /badutf8")
    others_still_deliver(conn, server, control)
    done = wait_status(conn, job, {"completed", "dead"}, timeout=15)
    assert done[0] == "completed" and done[1] == 1 and done[3]["status"] == 200, done
    body = done[3]["body"]
    assert body.startswith("caf") and body.endswith(" end"), repr(body)
    assert len(body) >= len(BAD_UTF8_BODY) - 12, "invalid sequences replaced, the rest kept"
    stays(lambda: server.attempts(path) == 1, 1, "sent again")
    assert [(d[0], d[1]) for d in deliveries(conn, job)] == [("delivered", 200)]
    check_no_leak(conn, hook, job, done[2])
    assert dispatcher_pid(conn) == pid


def test_invalid_utf8_header_value_is_delivered_once(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "badheader")
    job = enqueue(conn, name)
    done = wait_status(conn, job, {"completed", "dead"}, timeout=15)
    assert done[0] == "completed" and done[1] == 1 and done[3]["status"] == 200, done
    assert done[3]["headers"].get("x-fine") == "yes", done[3]["headers"]
    stays(lambda: server.attempts(path) == 1, 1, "sent again")
    others_still_deliver(conn, server, control)
    check_no_leak(conn, hook, job, done[2])
    assert dispatcher_pid(conn) == pid


def rss_anon_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def test_50_mb_body_is_truncated_in_bounded_memory(conn, server, control):
    pid = dispatcher_pid(conn)
    baseline = rss_anon_kb(pid)
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], rss_anon_kb(pid))
            except OSError:
                return
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        name, path, hook = hook_queue(conn, server, "huge")
        job = enqueue(conn, name)
        wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /huge")
        others_still_deliver(conn, server, control)
        done = wait_status(conn, job, {"completed", "dead"}, timeout=30)
    finally:
        stop.set()
        sampler.join()
    assert done[0] == "completed" and done[1] == 1 and done[3]["status"] == 200, done[:3]
    body = done[3]["body"]
    assert 1000 < len(body.encode()) <= RESPONSE_MAX_BYTES + 64, f"stored {len(body.encode())} bytes"
    [(outcome, code, _, _, logged)] = deliveries(conn, job)
    assert (outcome, code) == ("delivered", 200)
    assert len(logged.encode()) <= RESPONSE_MAX_BYTES + 64
    grown_mb = (peak[0] - baseline) / 1024
    assert grown_mb < HUGE_BYTES / 2**20 / 2, f"the dispatcher grew by {grown_mb:.0f} MB reading a 50 MB body"
    assert server.attempts(path) == 1
    check_no_leak(conn, hook, job, done[2])
    assert dispatcher_pid(conn) == pid


def test_redirect_to_loopback_is_not_followed_by_default(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "redirect-private")
    job = enqueue(conn, name)
    dead = wait_status(conn, job, {"dead", "completed"})
    assert dead[0] == "dead" and dead[1] == 1, f"a 3xx is permanent without follow_redirects: {dead[:3]}"
    assert "302" in dead[2]
    assert server.attempts(path) == 1
    assert server.attempts(f"/ok/{name}") == 0, "the redirect was followed"
    others_still_deliver(conn, server, control)
    check_no_leak(conn, hook, job, dead[2])
    assert dispatcher_pid(conn) == pid


def test_followed_redirect_is_rechecked_by_the_ssrf_guard(conn, server, control):
    pid = dispatcher_pid(conn)
    # To loopback, which the allowlist opens: followed, delivered once at the target.
    name, path, hook = hook_queue(conn, server, "redirect-private", webhook_follow_redirects=True)
    job = enqueue(conn, name)
    done = wait_status(conn, job, {"completed", "dead"})
    assert done[0] == "completed" and done[3]["status"] == 200, done[:3]
    assert server.attempts(path) == 1 and server.attempts(f"/ok/{name}") == 1
    check_no_leak(conn, hook, job, done[2])
    # To the cloud metadata address: refused by the guard at the hop, permanently, at once
    # (a connection attempt to 169.254.169.254 would time out instead).
    name, path, hook = hook_queue(conn, server, "redirect-private", webhook_follow_redirects=True)
    conn.execute("SELECT queue_ext.alter_queue(%s, webhook_url => %s)",
                 [name, hook.url.replace(f"/{name}?", f"/metadata/{name}?")])
    hook.path = f"/redirect-private/metadata/{name}"
    hook.url = hook.url.replace(f"/{name}?", f"/metadata/{name}?")
    job = enqueue(conn, name)
    dead = wait_status(conn, job, {"dead", "completed"}, timeout=HTTP_TIMEOUT_S * 3 + 10)
    assert dead[0] == "dead" and dead[1] == 1, dead[:3]
    assert "SSRF" in dead[2] and "timed out" not in dead[2], dead[2]
    assert server.attempts(hook.path) == 1
    others_still_deliver(conn, server, control)
    check_no_leak(conn, hook, job, dead[2])
    assert dispatcher_pid(conn) == pid


def test_silent_endpoint_times_out_each_attempt_once(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "silent", max_attempts=2)
    job = enqueue(conn, name)
    wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /silent")
    # While the request hangs, the other queue is served.
    others_still_deliver(conn, server, control)
    assert status(conn, job)[0] in ("running", "retrying", "queued")
    dead = wait_status(conn, job, {"dead", "completed"}, timeout=HTTP_TIMEOUT_S * 2 + 15)
    assert dead[0] == "dead" and dead[1] == 2, dead[:3]
    assert "timed out" in dead[2], dead[2]
    # Each attempt sent once; the retry of a request that reached the endpoint has the same id.
    stays(lambda: server.attempts(path) == 2, 1, "more requests than attempts")
    assert server.webhook_ids(path) == [f"msg_{job}"] * 2
    logged = deliveries(conn, job)
    assert len(logged) == 2 and all("timed out" in (d[2] or "") for d in logged), logged
    check_no_leak(conn, hook, job, dead[2])
    assert dispatcher_pid(conn) == pid


def test_reset_mid_body_after_a_200_is_a_delivery(conn, server, control):
    # The status line said 200, then the connection broke before the body ended: the receiver
    # acknowledged the webhook, so it is completed once (not sent again), with what came of
    # the body and a note saying how it ended.
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "reset", max_attempts=2)
    job = enqueue(conn, name)
    wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /reset")
    others_still_deliver(conn, server, control)
    done = wait_status(conn, job, {"completed", "dead"}, timeout=15)
    assert done[0] == "completed" and done[1] == 1, done[:3]
    stays(lambda: server.attempts(path) == 1, 2, "more requests than one")
    assert server.webhook_ids(path) == [f"msg_{job}"]
    logged = deliveries(conn, job)
    assert [d[1] for d in logged] == [200], logged
    note = conn.execute("SELECT error FROM queue_ext.webhook_deliveries WHERE job_id = %s", [job]).fetchone()[0]
    assert note and "reading the response body failed" in note, note
    check_no_leak(conn, hook, job, note)
    assert dispatcher_pid(conn) == pid


def test_reset_before_any_response_is_retried_with_the_same_id(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "reset-early", max_attempts=2)
    job = enqueue(conn, name)
    dead = wait_status(conn, job, {"dead", "completed"}, timeout=15)
    assert dead[0] == "dead" and dead[1] == 2, dead[:3]
    assert server.webhook_ids(path) == [f"msg_{job}"] * 2
    others_still_deliver(conn, server, control)
    check_no_leak(conn, hook, job, dead[2])
    assert dispatcher_pid(conn) == pid


def test_trickling_endpoint_is_cut_off_by_the_timeout(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "trickle", max_attempts=2)
    t0 = time.time()
    job = enqueue(conn, name)
    wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /trickle")
    others_still_deliver(conn, server, control)
    dead = wait_status(conn, job, {"dead", "completed"}, timeout=HTTP_TIMEOUT_S * 2 + 15)
    elapsed = time.time() - t0
    assert dead[0] == "dead" and dead[1] == 2, dead[:3]
    assert "timed out" in dead[2], dead[2]
    # A whole answer takes ~40 s at a byte a second; two attempts of 2 s each end well before.
    assert elapsed < HTTP_TIMEOUT_S * 2 + 8, f"{elapsed:.1f}s: the timeout did not cover the slow answer"
    assert server.webhook_ids(path) == [f"msg_{job}"] * 2
    check_no_leak(conn, hook, job, dead[2])
    assert dispatcher_pid(conn) == pid


def test_500s_are_retried_by_the_rules_then_dead(conn, server, control):
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "fail500", max_attempts=3)
    job = enqueue(conn, name)
    wait_for(lambda: server.attempts(path) >= 1, 10, what="the request to /fail500")
    others_still_deliver(conn, server, control)
    dead = wait_status(conn, job, {"dead", "completed"}, timeout=15)
    assert dead[0] == "dead" and dead[1] == 3, dead[:3]
    assert "500" in dead[2]
    stays(lambda: server.attempts(path) == 3, 1, "more requests than attempts")
    assert server.webhook_ids(path) == [f"msg_{job}"] * 3
    assert [d[1] for d in deliveries(conn, job)] == [500, 500, 500]
    check_no_leak(conn, hook, job, dead[2])
    assert dispatcher_pid(conn) == pid


def test_connection_refused_error_names_no_url(conn, server, control):
    # reqwest's own error text says "error sending request for url (...)": never stored.
    pid = dispatcher_pid(conn)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once closed
    name, path, hook = hook_queue(conn, server, "ok", max_attempts=1)
    hook.url = hook.url.replace(f":{server.port}/", f":{closed_port}/")
    conn.execute("SELECT queue_ext.alter_queue(%s, webhook_url => %s)", [name, hook.url])
    job = enqueue(conn, name)
    dead = wait_status(conn, job, {"dead", "completed"}, timeout=15)
    assert dead[0] == "dead" and dead[1] == 1, dead[:3]
    assert dead[2], "the error says what happened"
    check_no_leak(conn, hook, job, dead[2])
    others_still_deliver(conn, server, control)
    assert dispatcher_pid(conn) == pid


def test_every_fault_at_once_leaves_the_dispatcher_serving(conn, server, control):
    # All the hostile endpoints together, while the well-behaved queue takes 20 jobs.
    pid = dispatcher_pid(conn)
    hostile = []
    for kind in ("nul", "badutf8", "huge", "silent", "reset", "reset-early", "trickle", "fail500"):
        name, path, _ = hook_queue(conn, server, kind, max_attempts=2)
        hostile.append((enqueue(conn, name), path))
    name, path = control
    jobs = [enqueue(conn, name, f'{{"n": {i}}}') for i in range(20)]
    for job in jobs:
        wait_status(conn, job, {"completed"}, timeout=15)
    for job, path in hostile:
        final = wait_status(conn, job, {"completed", "dead"}, timeout=HTTP_TIMEOUT_S * 2 + 20)
        assert server.attempts(path) <= 2, f"{path}: {server.attempts(path)} requests for at most 2 attempts"
        assert set(server.webhook_ids(path)) == {f"msg_{job}"}, path
        assert final[1] == server.attempts(path), f"{path}: attempts recorded {final[1]}, sent {server.attempts(path)}"
    assert dispatcher_pid(conn) == pid


def test_sql_error_while_recording_is_recorded_on_the_job_and_the_dispatcher_goes_on(conn, server, control):
    # A real SQL error inside the dispatcher's bookkeeping: a trigger that refuses to archive
    # one queue's completed jobs. The poison job ends dead with the error (at once, or after
    # retries by the rules), each attempt sent once, never looped; jobs recorded in the same
    # turn are not held up.
    pid = dispatcher_pid(conn)
    name, path, hook = hook_queue(conn, server, "ok", max_attempts=2)
    conn.execute("""
        CREATE FUNCTION public.refuse_archive() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'archive refused for %', NEW.queue_name USING ERRCODE = 'P0001';
        END $$""")
    conn.execute(f"""CREATE TRIGGER refuse_archive BEFORE INSERT ON queue_ext.job_archive FOR EACH ROW
                     WHEN (NEW.queue_name = '{name}') EXECUTE FUNCTION public.refuse_archive()""")
    try:
        control_name, control_path = control
        with conn.transaction():  # one commit: both are claimed, sent and recorded together
            job = enqueue(conn, name)
            neighbours = [enqueue(conn, control_name, f'{{"n": {i}}}') for i in range(5)]
        for n in neighbours:
            wait_status(conn, n, {"completed"}, timeout=15)
        dead = wait_status(conn, job, {"dead", "completed"}, timeout=20)
        assert dead[0] == "dead" and 1 <= dead[1] <= 2, dead[:3]
        assert "archive refused" in dead[2], dead[2]
        stays(lambda: server.attempts(path) == dead[1], 2, "more requests than attempts, or a loop")
        assert server.webhook_ids(path) == [f"msg_{job}"] * dead[1]
        logged = deliveries(conn, job)
        assert len(logged) == dead[1], f"every attempt sent has its row in webhook_deliveries: {logged}"
        check_no_leak(conn, hook, job, dead[2])
        assert dispatcher_pid(conn) == pid, "the SQL error ended the dispatcher"
        others_still_deliver(conn, server, control)
    finally:
        conn.execute("DROP TRIGGER refuse_archive ON queue_ext.job_archive")
        conn.execute("DROP FUNCTION public.refuse_archive()")


def test_no_process_crashed(cluster):
    # Runs last: no fault above may have crashed a process (crash recovery would hide it from
    # the other assertions, though not from the dispatcher's pid).
    text = (cluster.dir / "server.log").read_text(errors="replace")
    crashes = [l for l in text.splitlines() if "terminated by signal" in l or "PANIC:" in l]
    assert crashes == [], "\n".join(crashes)
