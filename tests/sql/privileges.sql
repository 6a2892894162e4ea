-- kvembed regression tests: roles and privileges.
-- What an ordinary role may do (embed, change session settings, read
-- calibrations, use kv_status and kv_backfill on its own tables), what it may
-- not (42501: kv_restart, layer selection, storing calibrations, fault
-- injection, ALTER SYSTEM on kvembed.*; 55P02: SET of engine settings), and
-- what membership in kvembed_admin adds. Nothing here restarts the engine or
-- changes the server's configuration: granted privileges are checked with
-- has_*_privilege, refusals by running the statement.
\set VERBOSITY terse

-- Roles are cluster-wide: unique names, and leftovers of an interrupted run
-- removed first.
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_kvembed_user;
DROP ROLE IF EXISTS regress_kvembed_admin;
RESET client_min_messages;
CREATE ROLE regress_kvembed_user LOGIN;
CREATE ROLE regress_kvembed_admin LOGIN;
GRANT kvembed_admin TO regress_kvembed_admin;
GRANT CREATE ON SCHEMA public TO regress_kvembed_user, regress_kvembed_admin;

-- Runs a statement and returns 'ok' or its SQLSTATE and message.
CREATE FUNCTION regress_try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ' ' || SQLERRM;
END
$$;

-- Function privileges as installed.
SELECT f AS function,
       has_function_privilege('regress_kvembed_user', f, 'EXECUTE') AS ordinary,
       has_function_privilege('regress_kvembed_admin', f, 'EXECUTE') AS kvembed_admin_member
  FROM unnest(ARRAY['kv_embed(text,text)', 'kv_embed_half(text,text)', 'kv_embed_batch(text[],text)',
                    'kv_status()', 'kvembed.status_json()', 'kv_backfill(regclass,name,name,integer)',
                    'kv_select_layers(regclass,name,integer,boolean,text,text)',
                    'kvembed.select_layers_raw(text[],integer,real,text,text)', 'kv_restart()',
                    'kv_debug_fault(text)']) AS f;
SELECT has_schema_privilege('regress_kvembed_user', 'kvembed', 'USAGE') AS ordinary_uses_schema,
       has_table_privilege('regress_kvembed_user', 'kvembed.calibration', 'SELECT') AS ordinary_reads,
       has_table_privilege('regress_kvembed_user', 'kvembed.calibration', 'INSERT') AS ordinary_inserts,
       has_table_privilege('regress_kvembed_admin', 'kvembed.calibration', 'SELECT') AS admin_reads,
       has_table_privilege('regress_kvembed_admin', 'kvembed.calibration', 'INSERT') AS admin_inserts,
       has_table_privilege('regress_kvembed_admin', 'kvembed.calibration', 'UPDATE') AS admin_updates,
       has_table_privilege('regress_kvembed_admin', 'kvembed.calibration', 'DELETE') AS admin_deletes;
-- ALTER SYSTEM on the engine settings: kvembed_admin, except engine_path
-- (superusers only).
SELECT s.name,
       has_parameter_privilege('regress_kvembed_user', s.name, 'ALTER SYSTEM') AS ordinary,
       has_parameter_privilege('regress_kvembed_admin', s.name, 'ALTER SYSTEM') AS kvembed_admin_member
  FROM pg_settings s WHERE s.name LIKE 'kvembed.%' AND s.context = 'sighup' ORDER BY s.name;

-- An ordinary role.
SET ROLE regress_kvembed_user;
SELECT current_user;
-- It embeds, with any session settings.
SELECT vector_dims(kv_embed('hello')) AS dims,
       vector_dims(kv_embed_half('hello', 'query')) AS half_dims,
       cardinality(kv_embed_batch(ARRAY['a', NULL])) AS batch;
SET kvembed.max_tokens = 64;
SET kvembed.layers = '6-8';
SELECT state, dim, layers, layers_source, max_tokens FROM kv_status();
SELECT vector_dims(kv_embed('hello with other settings')) AS dims;
RESET kvembed.max_tokens;
RESET kvembed.layers;
SELECT kvembed.status_json()->>'state' AS state;
-- It reads the stored calibrations.
SELECT count(*) AS calibrations FROM kvembed.calibration;
-- It stores vectors in its own tables: generated columns, kv_backfill.
CREATE TABLE regress_user_docs (id int PRIMARY KEY, body text,
  emb vector(576) GENERATED ALWAYS AS (kv_embed(body)) STORED, plain vector);
INSERT INTO regress_user_docs (id, body)
  SELECT i, 'user document ' || i FROM generate_series(1, 8) AS i;
SET client_min_messages = warning;   -- kv_backfill's progress NOTICEs carry timings
CALL kv_backfill('regress_user_docs', 'body', 'plain', 3);
RESET client_min_messages;
SELECT count(emb) AS generated, count(plain) AS backfilled,
       bool_and((emb <=> plain) < 1e-5) AS same_vectors FROM regress_user_docs;
-- It cannot restart the engine, inject faults, run a layer selection (not
-- even without storing it), store a calibration, or change what the engine
-- loads.
SELECT stmt, regress_try(stmt) AS result
  FROM (VALUES ('SELECT kv_restart()'),
               ('SELECT kv_debug_fault(''panic'')'),
               ('SELECT * FROM kv_select_layers(''regress_user_docs'', ''body'', 8)'),
               ('SELECT * FROM kv_select_layers(''regress_user_docs'', ''body'', 8, store => false)'),
               ('SELECT kvembed.select_layers_raw(ARRAY[''a''])'),
               ('INSERT INTO kvembed.calibration (model_id, layers, curve) VALUES (''x'', ''{1}'', ''[]'')'),
               ('DELETE FROM kvembed.calibration'),
               ('SET kvembed.model = ''/tmp/evil.gguf'''),
               ('SET kvembed.device = ''cuda'''),
               ('SET kvembed.engine_path = ''/bin/sh''')) AS t(stmt);
-- ALTER SYSTEM cannot run in a function: plain statements.
ALTER SYSTEM SET kvembed.model = '/tmp/evil.gguf';
ALTER SYSTEM SET kvembed.threads = 1;
ALTER SYSTEM SET kvembed.engine_path = '/bin/sh';
DROP TABLE regress_user_docs;
RESET ROLE;

-- A member of kvembed_admin runs layer selections and stores calibrations;
-- it is no superuser (fault injection and engine_path stay refused).
SET ROLE regress_kvembed_admin;
SELECT current_user;
SELECT vector_dims(kv_embed('hello')) AS dims;
CREATE TABLE regress_admin_docs (body text);
INSERT INTO regress_admin_docs SELECT 'administrator sample sentence number ' || i FROM generate_series(1, 8) AS i;
SET client_min_messages = warning;   -- kv_select_layers' NOTICEs carry timings and model paths
SELECT count(*) AS layers, count(*) FILTER (WHERE selected) AS selected
  FROM kv_select_layers('regress_admin_docs', 'body', 8, store => false);
SELECT count(*) AS layers FROM kv_select_layers('regress_admin_docs', 'body', 8);
RESET client_min_messages;
SELECT created_by, source, sample_size FROM kvembed.calibration;
DELETE FROM kvembed.calibration;
SELECT stmt, regress_try(stmt) AS result
  FROM (VALUES ('SELECT kv_debug_fault(''panic'')'),
               ('SET kvembed.model = ''/tmp/evil.gguf''')) AS t(stmt);
ALTER SYSTEM SET kvembed.engine_path = '/bin/sh';
DROP TABLE regress_admin_docs;
RESET ROLE;

DROP FUNCTION regress_try(text);
REVOKE CREATE ON SCHEMA public FROM regress_kvembed_user, regress_kvembed_admin;
DROP ROLE regress_kvembed_user;
DROP ROLE regress_kvembed_admin;
