"""Collection rules shared by every test module."""
import pytest

from pgcluster import HAS_PG_CRON

# Tests that install pg_cron (CREATE EXTENSION pg_cron), by module or by test. Only Debian's
# PostgreSQL 15 has a pg_cron build here; on PostgreSQL 18 (QE_PG=18) they are skipped,
# everything else runs. schedule_job's refusal without pg_cron is tested on both versions.
NEEDS_PG_CRON = {"test_pg_cron.py", "test_examples.py", "test_hostile_input.py",
                 "test_roles.py::test_nobody_forges_a_callback"}


def pytest_collection_modifyitems(config, items):
    if HAS_PG_CRON:
        return
    skip = pytest.mark.skip(reason="needs pg_cron, which this PostgreSQL version has no build of")
    for item in items:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        if module in NEEDS_PG_CRON or f"{module}::{item.originalname}" in NEEDS_PG_CRON:
            item.add_marker(skip)
