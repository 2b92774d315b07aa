-- queue_ext 0.11.0 -> 0.12.0: no schema changes yet.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.12.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.12.0'" to load this file. \quit
