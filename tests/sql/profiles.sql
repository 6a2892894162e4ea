-- kvembed regression tests: embedding profiles.
-- kv_create_profile() freezes a session's settings for the loaded model;
-- kv_embed(text, role, profile) and kvembed.profile embed under it whatever
-- the session's settings; a profile of another model is an ERROR; generated
-- columns name their profile; kvembed.profile_columns shows them.
\set VERBOSITY terse
\pset null '<NULL>'
CREATE FUNCTION regress_sqlstate(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE;
END
$$;

SET kvembed.layers = 'default';
SELECT o->>'method' AS method, jsonb_array_length(o->'layers') AS layers,
       (o->>'bias')::real AS bias, (o->>'max_tokens')::int AS max_tokens,
       o->>'document_prompt' LIKE '%{text}%' AS prompt
  FROM kv_create_profile('regress_v1') AS o;
SELECT name, model_id = (SELECT model_id FROM kv_status()) AS this_model,
       fingerprint = kvembed.status_json()->>'fingerprint' AND fingerprint ~ '^sha256:[0-9a-f]{64}$' AS fingerprint,
       space_fit,
       created_by = current_user AS by_me
  FROM kvembed.profiles;

-- Under the profile, the session's settings no longer matter.
SELECT kv_embed('a text', 'document', 'regress_v1') <=> kv_embed('a text') < 1e-6 AS same_as_settings;
SET kvembed.bias = '3';
SET kvembed.max_tokens = 4;
SELECT kv_embed('a text about profiles', 'document', 'regress_v1') <=> kv_embed('a text about profiles') > 1e-4
       AS settings_differ;
SET kvembed.profile = 'regress_v1';
-- kv_status() shows the profile's settings, not the session's.
SELECT layers_source, max_tokens, bias FROM kv_status();
SELECT kv_embed('a text about profiles') <=> kv_embed('a text about profiles', 'document', 'regress_v1') < 1e-6
       AS profile_setting,
       kv_embed_half('a text', 'query', 'regress_v1')::vector <=> kv_embed('a text', 'query') < 1e-3 AS half,
       (kv_embed_batch(ARRAY['a text', NULL], 'query', 'regress_v1'))[2] IS NULL AS batch_null;
RESET kvembed.profile;
RESET kvembed.bias;
RESET kvembed.max_tokens;

-- A generated column that names its profile.
CREATE TABLE regress_prof (
  body text,
  emb  vector(576) GENERATED ALWAYS AS (kv_embed(body, 'document', 'regress_v1')) STORED
);
INSERT INTO regress_prof VALUES ('first row'), (NULL);
SELECT body, emb <=> kv_embed(body, 'document', 'regress_v1') < 1e-6 AS under_profile
  FROM regress_prof ORDER BY body;
SELECT kv_create_profile('regress_unused') IS NOT NULL AS created;
SELECT profile, model_id = (SELECT model_id FROM kv_status()) AS this_model, method, table_name, column_name
  FROM kvembed.profile_columns ORDER BY profile;
SELECT kv_drop_profile('regress_unused') AS dropped_unused;

-- Errors: an existing name (frozen), a bad name, an unknown profile, a
-- profile of another model, dropping a profile in use.
SELECT q AS call, regress_sqlstate(q) AS sqlstate
  FROM (VALUES ('SELECT kv_create_profile(''regress_v1'')'),
               ('SELECT kv_create_profile(''bad name'')'),
               ('SELECT kv_embed(''x'', ''document'', ''no_such_profile'')'),
               ('SELECT kv_drop_profile(''regress_v1'')')) AS t(q);
-- Moved weights are the same model (the fingerprint is of the content);
-- other weights are not.
UPDATE kvembed.profiles SET model_id = 'llama:/moved/elsewhere.gguf' WHERE name = 'regress_v1';
SELECT regress_sqlstate('SELECT kv_embed(''x'', ''document'', ''regress_v1'')') AS moved;
UPDATE kvembed.profiles SET fingerprint = 'sha256:0123456789abcdef' WHERE name = 'regress_v1';
SELECT q AS call, regress_sqlstate(q) AS sqlstate
  FROM (VALUES ('SELECT kv_embed(''x'', ''document'', ''regress_v1'')'),
               ('INSERT INTO regress_prof VALUES (''second row'')')) AS t(q);
SELECT count(*) AS rows_kept FROM regress_prof;

-- Only superusers and kvembed_admin create and drop profiles; anyone uses them.
CREATE ROLE regress_prof_user;
GRANT SELECT ON regress_prof TO regress_prof_user;
SET ROLE regress_prof_user;
SELECT regress_sqlstate('SELECT kv_create_profile(''regress_user'')') AS create_profile,
       regress_sqlstate('SELECT kv_drop_profile(''regress_v1'', force => true)') AS drop_profile,
       regress_sqlstate('UPDATE kvembed.profiles SET options = ''{}''') AS update_profile;
RESET ROLE;
DROP TABLE regress_prof;
DROP ROLE regress_prof_user;

SELECT kv_drop_profile('regress_v1') AS dropped, kv_drop_profile('regress_v1') AS dropped_again;
DROP FUNCTION regress_sqlstate(text);
RESET kvembed.layers;
