-- Roles see and do only what they were granted.
\set VERBOSITY terse
CREATE ROLE regress_producer_a LOGIN;
CREATE ROLE regress_producer_b LOGIN;
CREATE ROLE regress_worker LOGIN;
GRANT queue_ext_producer TO regress_producer_a, regress_producer_b;
GRANT queue_ext_worker TO regress_worker;
SELECT queue_ext.create_queue('shared', webhook_url => 'https://example.com/hook', webhook_secret => 'whsec_c2VjcmV0');

SET ROLE regress_producer_a;
SELECT queue_ext.enqueue_job('shared', '{"owner": "a"}') IS NOT NULL AS enqueued;
SELECT * FROM queue_ext.get_next_job('shared');
SELECT queue_ext.create_queue('mine');
SELECT secret FROM queue_ext.webhook_targets;
UPDATE queue_ext.job_queue SET priority = 'critical';
RESET ROLE;

SET ROLE regress_producer_b;
SELECT queue_ext.enqueue_job('shared', '{"owner": "b"}') IS NOT NULL AS enqueued;
SELECT payload->>'owner' AS visible_to_b FROM queue_ext.job_queue ORDER BY 1;
RESET ROLE;

SET ROLE regress_worker;
SELECT payload->>'owner' AS visible_to_worker FROM queue_ext.job_queue ORDER BY 1;
SELECT queue_ext.enqueue_job('shared', '{}');
SELECT queue_ext.purge_jobs('1 day');
RESET ROLE;
SELECT queue_ext.pause_queue('shared');
DELETE FROM queue_ext.job_queue;
DROP OWNED BY regress_producer_a, regress_producer_b, regress_worker;
DROP ROLE regress_producer_a, regress_producer_b, regress_worker;
