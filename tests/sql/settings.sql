-- kvembed regression tests: the kvembed.* settings.
-- Their definitions and defaults, what a session may SET, how the session
-- settings show in kv_status() and change the vectors, and how invalid
-- values are reported (at SET for PostgreSQL's own checks, 22023 when a
-- text is embedded for kvembed's).
\set VERBOSITY terse

-- Runs a query with one setting changed for its duration only, and returns
-- its first column as text, or its SQLSTATE and message when it fails. The
-- setting is undone by rolling back a subtransaction, so that it cannot leak
-- into the next call.
CREATE FUNCTION regress_eval(q text, setting text DEFAULT NULL, value text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  result text;
BEGIN
  BEGIN
    IF setting IS NOT NULL THEN
      PERFORM set_config(setting, value, true);
    END IF;
    EXECUTE q INTO result;
    RAISE EXCEPTION 'undo' USING ERRCODE = 'RGUND';
  EXCEPTION
    WHEN SQLSTATE 'RGUND' THEN RETURN coalesce(result, 'ok');
    WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM;
  END;
END
$$;

-- Every setting, its compiled-in default, unit, range and who may change it
-- (sighup: engine settings, postgresql.conf / ALTER SYSTEM; user: sessions).
SELECT name, boot_val, unit, context, vartype, min_val, max_val, enumvals
  FROM pg_settings WHERE name LIKE 'kvembed.%' ORDER BY name;
-- The session settings are at their defaults here.
SELECT name, setting = boot_val AS at_default
  FROM pg_settings WHERE name LIKE 'kvembed.%' AND context = 'user' ORDER BY name;
SHOW kvembed.start_timeout;
SHOW kvembed.engine_timeout;

-- Session settings show in kv_status() from the next statement.
SET kvembed.layers = '27-29';
SET kvembed.bias = '2.5';
SET kvembed.document_prompt = 'Document: {text}';
SET kvembed.query_prompt = 'Query: {text}';
SET kvembed.max_tokens = 64;
SET kvembed.on_overflow = 'error';
SELECT method, layers, layers_source, bias, document_prompt, query_prompt, max_tokens, on_overflow
  FROM kv_status();
SET kvembed.method = 'kv-paper';
SELECT method FROM kv_status();
RESET ALL;
SELECT method, layers, layers_source, bias, max_tokens, on_overflow FROM kv_status();
-- kv_status() shows what the session's method runs on this model, not the
-- default method's settings: each method's own layers, bias and prompt (no
-- layers and no bias for a method without re-routing)...
SELECT value AS method,
       regress_eval('SELECT layers FROM kv_status()', 'kvembed.method', value) AS layers,
       regress_eval($q$SELECT coalesce(bias::text, 'none') FROM kv_status()$q$, 'kvembed.method', value) AS bias,
       regress_eval('SELECT document_prompt FROM kv_status()', 'kvembed.method', value) AS document_prompt
  FROM (VALUES ('kv'), ('kv-paper'), ('mean'), ('token-prepending')) AS t(value);
-- ...and the layers it shows are the ones that run: set explicitly, they
-- give the same vector.
SET kvembed.method = 'kv-paper';
CREATE TABLE regress_status_paper AS
  SELECT kv_embed('The quick brown fox jumps over the lazy dog.') AS v,
         (SELECT array_to_string(layers, ',') FROM kv_status()) AS layers;
SELECT set_config('kvembed.layers', layers, false) <> '' AS layers_set FROM regress_status_paper;
SELECT (v <=> kv_embed('The quick brown fox jumps over the lazy dog.')) < 1e-5 AS shown_layers_are_run
  FROM regress_status_paper;
DROP TABLE regress_status_paper;
RESET ALL;
-- Layer lists: ranges, braces, blanks, duplicates; 'default' ignores any
-- calibration; 'auto' and '' use it where one is stored (none is here).
SELECT value, regress_eval('SELECT layers FROM kv_status()', 'kvembed.layers', value) AS layers,
       regress_eval('SELECT layers_source FROM kv_status()', 'kvembed.layers', value) AS source
  FROM (VALUES ('6,7,8'), ('6-8'), ('{8, 6,7,7}'), ('[6, 7-8]'), ('default'), ('auto'), ('')) AS t(value);
-- 'default' as a value must be quoted: SET ... = default is SQL's RESET.
SET kvembed.layers = default;
SHOW kvembed.layers;
SET kvembed.layers = 'default';
SHOW kvembed.layers;
RESET kvembed.layers;
-- max_tokens: 0 is the engine's limit, and no session goes above
-- kvembed.max_tokens_limit (4096 by default).
SELECT value, regress_eval('SELECT max_tokens FROM kv_status()', 'kvembed.max_tokens', value) AS max_tokens
  FROM (VALUES ('16'), ('0'), ('4096'), ('5000')) AS t(value);

-- The settings change the vectors. Values equal to the method's defaults
-- give the same vectors as no setting at all; other values other vectors.
CREATE TABLE regress_settings_vec (label text PRIMARY KEY, v vector);
INSERT INTO regress_settings_vec VALUES ('default', kv_embed('The quick brown fox jumps over the lazy dog.')),
                                        ('default query', kv_embed('The quick brown fox jumps over the lazy dog.', 'query'));
SELECT setting, value, role,
       regress_eval(format($q$SELECT (v <=> kv_embed('The quick brown fox jumps over the lazy dog.', %L)) < 1e-5
                              FROM regress_settings_vec WHERE label = %L$q$,
                            role, CASE role WHEN 'query' THEN 'default query' ELSE 'default' END),
                    setting, value) AS same_as_default
  FROM (VALUES ('kvembed.layers', '20-22', 'document'),
               ('kvembed.layers', 'default', 'document'),
               ('kvembed.bias', '1', 'document'),
               ('kvembed.bias', 'default', 'document'),
               ('kvembed.method', 'kv', 'document'),
               ('kvembed.method', ' kv ', 'document'),
               ('kvembed.document_prompt', 'This sentence : "{text}" means in one word:"', 'document'),
               ('kvembed.query_prompt', 'This search query : "{text}" means in one word:"', 'query'),
               ('kvembed.document_prompt', 'Document: {text}', 'query'),
               ('kvembed.query_prompt', 'Query: {text}', 'document'),
               ('kvembed.max_tokens', '16', 'document'),
               ('kvembed.on_overflow', 'error', 'document'),
               ('kvembed.layers', '6-8', 'document'),
               ('kvembed.bias', '3', 'document'),
               ('kvembed.method', 'kv-no-reroute', 'document'),
               ('kvembed.method', 'kv-paper', 'document'),
               ('kvembed.method', 'mean', 'document'),
               ('kvembed.document_prompt', 'Document: {text}', 'document'),
               ('kvembed.query_prompt', 'Query: {text}', 'query')) AS t(setting, value, role);
-- SET LOCAL lasts until the end of the transaction.
BEGIN;
SET LOCAL kvembed.layers = '6-8';
SELECT layers FROM kv_status();
COMMIT;
SELECT layers, layers_source FROM kv_status();

-- Invalid values. PostgreSQL checks numbers, enums and names at SET; an
-- engine setting cannot be SET in a session (55P02).
SELECT setting, value, regress_eval('SELECT 1', setting, value) AS result
  FROM (VALUES ('kvembed.max_tokens', '-1'),
               ('kvembed.max_tokens', 'many'),
               ('kvembed.on_overflow', 'maybe'),
               ('kvembed.no_such_setting', '1'),
               ('kvembed.model', '/tmp/evil.gguf'),
               ('kvembed.device', 'cuda'),
               ('kvembed.threads', '1'),
               ('kvembed.batch_tokens', '100'),
               ('kvembed.engine_path', '/bin/sh'),
               ('kvembed.engine_memory_limit', '0'),
               ('kvembed.max_tokens_limit', '10'),
               ('kvembed.max_calibration_texts', '10')) AS t(setting, value);
-- kvembed checks its string settings when a text is embedded (22023).
SELECT setting, value, regress_eval($q$SELECT kv_embed('x')$q$, setting, value) AS result
  FROM (VALUES ('kvembed.layers', 'six'),
               ('kvembed.layers', '5-3'),
               ('kvembed.layers', '6,,x'),
               ('kvembed.layers', '99'),
               ('kvembed.bias', 'lots'),
               ('kvembed.bias', 'NaN'),
               ('kvembed.bias', 'inf'),
               ('kvembed.document_prompt', 'no placeholder'),
               ('kvembed.document_prompt', 'A {text}{+}no placeholder'),
               ('kvembed.method', 'nope'),
               ('kvembed.method', 'KV')) AS t(setting, value);
-- Every session setting is checked for every text: an invalid query prompt
-- also fails document embeddings.
SELECT regress_eval($q$SELECT kv_embed('x', 'query')$q$, 'kvembed.query_prompt', 'no placeholder') AS query,
       regress_eval($q$SELECT kv_embed('x', 'document')$q$, 'kvembed.query_prompt', 'no placeholder') AS document;
-- The same in a plain session: SET succeeds, the embedding fails, and the
-- session works again after RESET.
SET kvembed.layers = 'six';
SHOW kvembed.layers;
SELECT kv_embed('x');
RESET kvembed.layers;
SELECT vector_dims(kv_embed('x')) AS dims;
-- A prompt ensemble: kv_status() shows its three templates joined by {+},
-- and kv_embed returns one unit vector of the model's width (the
-- normalized mean of the vectors under each template): near kv's, not it.
CREATE TEMP TABLE regress_ensemble AS SELECT kv_embed('A man is playing a guitar.') AS kv;
SET kvembed.method = 'kv-ensemble';
SELECT method, array_length(string_to_array(document_prompt, '{+}'), 1) AS templates,
       array_length(string_to_array(query_prompt, '{+}'), 1) AS query_templates, layers
  FROM kv_status();
SELECT vector_dims(e) = vector_dims(kv) AS same_width,
       round(vector_norm(e)::numeric, 4) AS norm,
       (e <=> kv) > 0.0001 AS not_kv, (e <=> kv) < 0.3 AS near_kv
  FROM regress_ensemble, LATERAL (SELECT kv_embed('A man is playing a guitar.') AS e) x;
-- A prompt set written out in kvembed.document_prompt is the same ensemble.
SELECT set_config('kvembed.document_prompt', document_prompt, false) IS NOT NULL AS set
  FROM kv_status();
SET kvembed.method = 'kv';
SELECT kv_embed('A man is playing a guitar.') = e AS same_vector
  FROM (SELECT regress_eval($q$SELECT kv_embed('A man is playing a guitar.')::text$q$,
                            'kvembed.method', 'kv-ensemble')::vector AS e) x;
RESET kvembed.document_prompt;
RESET kvembed.method;
DROP TABLE regress_ensemble;
-- All the settings are back at their defaults.
SELECT count(*) FILTER (WHERE setting <> boot_val) AS changed
  FROM pg_settings WHERE name LIKE 'kvembed.%' AND context = 'user';

DROP TABLE regress_settings_vec;
DROP FUNCTION regress_eval(text, text, text);
