CREATE EXTENSION queue_ext;
SELECT extname, extversion FROM pg_extension WHERE extname = 'queue_ext';
SELECT rolname FROM pg_roles WHERE rolname LIKE 'queue\_ext\_%' ORDER BY 1;
