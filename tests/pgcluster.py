"""A throwaway cluster for tests that need their own: restarts, crashes, special settings.
Wraps scripts/cluster.sh (which runs Postgres as the postgres user). QE_PG=18 in the
environment runs every cluster on PostgreSQL 18 (scripts/pgversion.sh), in its own directories."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"
# The version's binaries, pg_config and directory prefix, as the shell scripts see them.
PGBIN, PG_CONFIG, QE_TAG, PRELOAD = subprocess.run(
    ["bash", "-c", f"source {ROOT}/scripts/pgversion.sh && echo \"$PGBIN\"; echo \"$PG_CONFIG\"; "
                   "echo \"$QE_TAG\"; echo \"$PRELOAD\""],
    capture_output=True, text=True, check=True).stdout.split("\n")[:4]
HAS_PG_CRON = "pg_cron" in PRELOAD.split(",")


def _without_missing_libraries(setting: str) -> str:
    """A shared_preload_libraries line without pg_cron where this version has none."""
    name, _, value = setting.partition("=")
    if HAS_PG_CRON or name.strip() != "shared_preload_libraries":
        return setting
    libs = [lib.strip() for lib in value.strip().strip("'").split(",")]
    return "shared_preload_libraries = '" + ",".join(lib for lib in libs if lib and lib != "pg_cron") + "'"


class Cluster:
    def __init__(self, name: str, port: int, settings: list[str], unset: tuple[str, ...] = ()):
        self.dir = Path(f"/tmp/queue_ext_{QE_TAG}{name}")
        self.port = port
        self.settings = [_without_missing_libraries(s) for s in settings]
        # Settings scripts/cluster.sh writes that this cluster must not have (commented out).
        self.unset = unset
        self.dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    def start(self, fresh: bool = False):
        if fresh:
            self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
        subprocess.run(["bash", str(CLUSTER_SH), "start", str(self.dir), str(self.port), *self.settings],
                       check=True)
        if self.unset and self._comment_out(self.unset):
            subprocess.run(["bash", str(CLUSTER_SH), "restart", str(self.dir)], check=True)

    def _comment_out(self, names) -> bool:
        conf = self.dir / "data" / "postgresql.conf"
        lines = conf.read_text().splitlines(True)
        out = ["#" + l if l.split("=")[0].strip() in names else l for l in lines]
        if out == lines:
            return False
        conf.write_text("".join(out))  # in place: keeps the file's owner (postgres)
        return True

    def stop(self):
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(self.dir)], check=False)
        if (self.dir / "data" / "postmaster.pid").exists():
            # A fast shutdown that did not finish (a process ignoring SIGTERM): do not leave
            # the cluster behind; tests that restart check that shutdowns finish.
            subprocess.run(["sudo", "-u", "postgres", f"{PGBIN}/pg_ctl", "-D",
                            str(self.dir / "data"), "-m", "immediate", "-w", "stop"], check=False)

    def connect(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, **kw)

    def wait_ready(self, timeout: float = 60):
        """Waits until connections succeed (after a crash restart)."""
        deadline = time.time() + timeout
        while True:
            try:
                with self.connect() as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def postmaster_pid(self) -> int:
        return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])

    def kill_postmaster(self):
        """kill -9 of the postmaster. Its children exit when they notice; then start again."""
        pid = self.postmaster_pid()
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(int(p)) for p in [pid, *children]):
            time.sleep(0.1)
        # The dead postmaster may linger as a zombie nobody reaps, which makes its lock file
        # look live; it is not, so remove it as an operator would.
        (self.dir / "data" / "postmaster.pid").unlink(missing_ok=True)
        (self.dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
        self.start()
        self.wait_ready()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "".join((self.dir / "server.log").read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


def dispatcher_pid(conn) -> int | None:
    # dispatcher_status() lists the dispatcher of every database: this one's is ours.
    row = conn.execute("SELECT pid FROM queue_ext.dispatcher_status() "
                       "WHERE running AND database = current_database()").fetchone()
    return row[0] if row else None


def wait_for(predicate, timeout: float = 20, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
