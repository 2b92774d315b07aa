"""The packages scripts/package.sh builds from this tree: the .deb for PostgreSQL 15, installed
with dpkg into the system, serves a fresh cluster (a job enqueued, claimed and completed; a
webhook delivered to a loopback receiver); the PostgreSQL 18 tarball holds the library and every
install and upgrade script; META.json names this version."""
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from pgcluster import PG_CONFIG, ROOT, Cluster, wait_for
from sink import Sink

VERSION = re.search(r'^version = "(.*)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
MAJOR = subprocess.run([PG_CONFIG, "--version"], capture_output=True, text=True,
                       check=True).stdout.split()[1].split(".")[0]


def test_meta_json_names_this_version():
    meta = json.loads((ROOT / "META.json").read_text())
    assert meta["name"] == "queue_ext"
    assert meta["version"] == VERSION
    assert meta["provides"]["queue_ext"]["version"] == VERSION
    assert meta["meta-spec"]["version"] == "1.0.0"


@pytest.fixture(scope="module")
def package() -> Path:
    """Built for the version under test, from the current tree (the build install.sh uses)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "package.sh"), MAJOR],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.split()[-1])
    assert path.exists(), path
    return path


def upgrade_scripts() -> set[str]:
    return {p.name for p in (ROOT / "sql").glob("queue_ext--*--*.sql")}


@pytest.mark.skipif(MAJOR != "15", reason="the .deb is Debian's PostgreSQL 15 build")
def test_deb_installs_and_serves_a_fresh_cluster(package):
    assert package.name == f"postgresql-15-queue-ext_{VERSION}_amd64.deb"
    field = lambda name: subprocess.run(["dpkg-deb", "--field", str(package), name], capture_output=True,
                                        text=True, check=True).stdout.strip()
    assert (field("Package"), field("Version"), field("Architecture")) == \
        ("postgresql-15-queue-ext", VERSION, "amd64")
    listing = subprocess.run(["dpkg-deb", "--contents", str(package)], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    libdir = subprocess.run([PG_CONFIG, "--pkglibdir"], capture_output=True, text=True, check=True).stdout.strip()
    extdir = subprocess.run([PG_CONFIG, "--sharedir"], capture_output=True, text=True,
                            check=True).stdout.strip() + "/extension"
    expected = {f"{libdir}/queue_ext.so", f"{extdir}/queue_ext.control", f"{extdir}/queue_ext--{VERSION}.sql"} | \
        {f"{extdir}/{name}" for name in upgrade_scripts()}
    assert expected <= files, expected - files

    # dpkg unpacks each file under a temporary name and renames it over the old one, so this is
    # safe beside running servers; the files are this tree's build, as scripts/install.sh's are.
    done = subprocess.run(["dpkg", "-i", str(package)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "postgresql-15-queue-ext"],
                               capture_output=True, text=True, check=True).stdout
    assert installed == f"install ok installed {VERSION}"
    owned = subprocess.run(["dpkg", "-S", f"{libdir}/queue_ext.so"], capture_output=True, text=True)
    assert owned.stdout.startswith("postgresql-15-queue-ext:"), owned.stdout + owned.stderr

    sink = Sink()
    c = Cluster("package", 25591, ["queue_ext.http_allowlist = '127.0.0.1'"])
    c.start(fresh=True)
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION queue_ext")
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone() == \
                (VERSION,)
            conn.execute("SELECT queue_ext.create_queue('pkg')")
            job = conn.execute("SELECT queue_ext.enqueue_job('pkg', '{\"n\": 1}')").fetchone()[0]
            claimed = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('pkg')").fetchone()
            assert claimed[0] == job
            conn.execute("SELECT queue_ext.complete_job(%s, '{\"ok\": true}', %s)", claimed)
            assert conn.execute("SELECT status FROM queue_ext.job_archive WHERE id = %s", [job]).fetchone() == \
                ("completed",)

            conn.execute("SELECT queue_ext.create_queue('pkg_hook', webhook_url => %s)", [sink.url + "/pkg"])
            hook = conn.execute("SELECT queue_ext.enqueue_job('pkg_hook', '{\"hello\": \"deb\"}')").fetchone()[0]
        delivered = wait_for(lambda: sink.to("/pkg"), 30, what="the webhook from the packaged dispatcher")
        assert delivered[0].json() == {"hello": "deb"}
        with c.connect() as conn:
            wait_for(lambda: conn.execute("SELECT status FROM queue_ext.job_archive WHERE id = %s",
                                          [hook]).fetchone() == ("completed",), 20, what="the webhook job completed")
    finally:
        c.stop()
        sink.close()


@pytest.mark.skipif(MAJOR == "15", reason="PostgreSQL 15 is packaged as a .deb")
def test_tarball_holds_the_library_and_every_script(package):
    assert package.name == f"queue_ext-{VERSION}-pg{MAJOR}-linux-x86_64.tar.gz"
    top = f"queue_ext-{VERSION}-pg{MAJOR}"
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
        assert all(m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    expected = {f"{top}/lib/queue_ext.so", f"{top}/share/extension/queue_ext.control",
                f"{top}/share/extension/queue_ext--{VERSION}.sql"} | \
        {f"{top}/share/extension/{name}" for name in upgrade_scripts()}
    assert expected <= names, expected - names
