-- queue_ext 0.9.0 -> 0.10.0: (in development; filled in as the release's changes land).
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.10.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.10.0'" to load this file. \quit
