-- Everything the extension owns, described in a form that two databases can diff: a
-- database upgraded with ALTER EXTENSION UPDATE must match a fresh install line for line.
WITH members AS (
    SELECT d.classid, d.objid FROM pg_depend AS d
    JOIN pg_extension AS e ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid AND d.deptype = 'e'
    WHERE e.extname = 'queue_ext'
), rels AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class AS c JOIN members AS m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
)
SELECT line FROM (
    SELECT 'function ' || p.oid::regprocedure || ' secdef=' || p.prosecdef || ' config=' || coalesce(p.proconfig::text, '')
           || ' acl=' || coalesce(p.proacl::text, '') || E'\n' || pg_get_functiondef(p.oid) AS line
    FROM pg_proc AS p JOIN members AS m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
    UNION ALL
    SELECT 'relation ' || r.relname || ' kind=' || r.relkind::text || ' acl=' || coalesce(c.relacl::text, '')
           || ' rls=' || c.relrowsecurity || ' comment=' || coalesce(obj_description(r.oid, 'pg_class'), '')
    FROM rels AS r JOIN pg_class AS c ON c.oid = r.oid
    UNION ALL
    SELECT 'column ' || r.relname || '.' || a.attnum || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
           || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END
    FROM rels AS r JOIN pg_attribute AS a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef AS ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
    WHERE r.relkind IN ('r', 'v')
    UNION ALL
    SELECT 'constraint ' || r.relname || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
    FROM rels AS r JOIN pg_constraint AS co ON co.conrelid = r.oid
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
    FROM rels AS r JOIN pg_index AS i ON i.indrelid = r.oid
    UNION ALL
    SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM rels AS r JOIN pg_trigger AS t ON t.tgrelid = r.oid AND NOT t.tgisinternal
    UNION ALL
    SELECT 'policy ' || pol.tablename || ' ' || pol.policyname || ' ' || pol.cmd || ' ' || pol.roles::text || ' '
           || coalesce(pol.qual, '') || ' ' || coalesce(pol.with_check, '')
    FROM pg_policies AS pol WHERE pol.schemaname = 'queue_ext'
    UNION ALL
    SELECT 'view ' || r.relname || E'\n' || pg_get_viewdef(r.oid) FROM rels AS r WHERE r.relkind = 'v'
    UNION ALL
    SELECT 'type ' || t.typname || ' ' || coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                                                   FROM pg_enum AS e WHERE e.enumtypid = t.oid), '')
    FROM pg_type AS t JOIN members AS m ON m.classid = 'pg_type'::regclass AND m.objid = t.oid
    UNION ALL
    SELECT 'config dump ' || unnest(e.extconfig)::regclass::text FROM pg_extension AS e WHERE e.extname = 'queue_ext'
    UNION ALL
    SELECT 'schema acl ' || coalesce(n.nspacl::text, '') FROM pg_namespace AS n WHERE n.nspname = 'queue_ext'
) AS everything
ORDER BY line;
