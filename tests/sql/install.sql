-- kvembed regression tests: installation and the SQL surface.
-- Runs first: creates the extensions in the database pg_regress made, waits
-- for the engine to load its model, and pins what the extension installs.
\set VERBOSITY terse

CREATE EXTENSION kvembed CASCADE;   -- CASCADE also creates pgvector's "vector"
SELECT extname FROM pg_extension WHERE extname IN ('vector', 'kvembed') ORDER BY 1;

-- The first embedding waits for the engine to start and load the model
-- (kvembed.start_timeout); give a slow or emulated machine room.
SET kvembed.start_timeout = '10min';
SELECT vector_dims(kv_embed('warm-up: wait until the engine has loaded its model')) AS dim;
RESET kvembed.start_timeout;
-- The default test model: SmolLM2-135M (llama, 30 layers, 576 dimensions).
SELECT state, architecture, dim, n_layers, load_error IS NULL AS no_load_error
  FROM kv_status();

-- Everything the extension owns (but types: PostgreSQL 18 also records a
-- table's row types as members, PostgreSQL 15 does not).
SELECT pg_describe_object(classid, objid, objsubid) AS member
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'kvembed')
   AND classid <> 'pg_type'::regclass
 ORDER BY 1;

-- Signatures, result types and properties of the functions (kind: f
-- function, p procedure; volatility: i immutable, v volatile; parallel:
-- s safe, u unsafe).
SELECT p.oid::regprocedure AS function, p.prokind AS kind, p.provolatile AS volatility,
       p.proisstrict AS strict, p.proparallel AS parallel
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'kvembed')
 ORDER BY p.oid::regprocedure::text;
SELECT p.oid::regprocedure AS function, pg_get_function_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'kvembed')
   AND p.oid <> 'kv_status()'::regprocedure
 ORDER BY p.oid::regprocedure::text;
-- kv_status() returns one row with these columns.
SELECT a.n AS position, a.name AS column, format_type(a.type, NULL) AS type
  FROM pg_proc p,
       unnest(p.proargnames, p.proallargtypes, p.proargmodes) WITH ORDINALITY AS a(name, type, mode, n)
 WHERE p.oid = 'kv_status()'::regprocedure AND a.mode = 't'
 ORDER BY a.n;

-- The user functions live in the extension's schema (public here), the
-- internals in the schema kvembed.
SELECT e.extnamespace::regnamespace AS extension_schema, e.extrelocatable AS relocatable
  FROM pg_extension e WHERE e.extname = 'kvembed';
SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull AS not_null
  FROM pg_attribute
 WHERE attrelid = 'kvembed.calibration'::regclass AND attnum > 0 AND NOT attisdropped
 ORDER BY attnum;

-- kvembed_admin: a plain NOLOGIN role created by the extension.
SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls
  FROM pg_roles WHERE rolname = 'kvembed_admin';

-- DROP EXTENSION leaves the cluster-wide role in place, and installing again
-- accepts it (it is still the role kvembed creates).
DROP EXTENSION kvembed;
SELECT count(*) AS kvembed_admin_roles FROM pg_roles WHERE rolname = 'kvembed_admin';
SELECT count(*) AS vector_still_installed FROM pg_extension WHERE extname = 'vector';
CREATE EXTENSION kvembed;
SELECT vector_dims(kv_embed('installed again')) AS dim;
