-- queue_ext 0.3.0 -> 0.4.0: trust. Leases expire without the dispatcher (a claim reclaims
-- them), internal queues take jobs only from the extension, dedupe keys are scoped to the
-- producer that set them, settings are bounded so that no value can break a claim or a
-- retry, and nothing a producer or a worker can read names a webhook's credentials.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.4.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.4.0'" to load this file. \quit
