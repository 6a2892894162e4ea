-- kvembed regression tests: layer calibration (kv_select_layers).
-- A small sample (fewer than 32 texts is too few to check the intrinsic
-- dimension minimum, so the selection falls back to kv's default window,
-- layers 20-22 on SmolLM2-135M, on any CPU): the curve has one row per layer,
-- the choice is stored for the loaded model, kv_status() and
-- kvembed.layers = 'auto' use it, store => false writes nothing, and bad
-- arguments are refused. The space calibration fitted on the same sample is
-- stored with it and applied while the session's method, bias and document
-- prompt are the ones it was fitted for and kvembed.space_calibration is on. The NOTICEs (timings, the model's path) are left
-- out. Runs last: it stores, then deletes, a calibration.
\set VERBOSITY terse

CREATE TABLE regress_calib (id int PRIMARY KEY, body text);
INSERT INTO regress_calib
  SELECT i, format('Sentence number %s is about %s.', i,
                   (ARRAY['cooking', 'astronomy', 'football', 'programming'])[1 + i % 4])
    FROM generate_series(1, 16) AS i;
INSERT INTO regress_calib VALUES (100, NULL);
SELECT count(*) AS calibrations FROM kvembed.calibration;
SELECT layers, layers_source FROM kv_status();
CREATE TABLE regress_calib_vec (label text PRIMARY KEY, v vector);
INSERT INTO regress_calib_vec VALUES ('before', kv_embed('a calibrated text'));

-- Compute without storing.
SET client_min_messages = warning;
SELECT count(*) AS layers, min(layer) AS first, max(layer) AS last,
       array_agg(layer ORDER BY layer) FILTER (WHERE selected) AS selected,
       bool_and(intrinsic_dimension > 0 AND intrinsic_dimension < 'Infinity') AS finite
  FROM kv_select_layers('regress_calib', 'body', 16, store => false);
RESET client_min_messages;
SELECT count(*) AS calibrations FROM kvembed.calibration;

-- Compute and store (the default).
SET client_min_messages = warning;
SELECT array_agg(layer ORDER BY layer) FILTER (WHERE selected) AS selected
  FROM kv_select_layers('regress_calib', 'body');
RESET client_min_messages;
SELECT model_id = (SELECT model_id FROM kv_status()) AS for_loaded_model,
       layers, source, sample_size, created_by = current_user AS by_me,
       jsonb_array_length(curve) AS curve_layers,
       rule LIKE '%too few to check%' AND rule LIKE '%default window%' AS fell_back_to_default
  FROM kvembed.calibration;
-- The space calibration: the mean, and at most sample - 1 directions.
SELECT space_fit, space_options,
       cardinality(space_mean) = (SELECT dim FROM kv_status()) AS mean_has_dim,
       cardinality(space_gains) BETWEEN 1 AND 15 AS directions_from_sample,
       cardinality(space_directions) = cardinality(space_gains) * cardinality(space_mean) AS shapes_agree
  FROM kvembed.calibration;
-- kvembed.layers = 'auto' (the default) uses it; 'default' ignores it.
SELECT layers, layers_source FROM kv_status();
SET kvembed.layers = 'default';
SELECT layers, layers_source FROM kv_status();
RESET kvembed.layers;
SELECT space FROM kv_status();
-- The stored window is the default one here: the space calibration alone
-- changes the vectors, which stay of unit length; off, they are as before.
SELECT (v <=> kv_embed('a calibrated text')) > 1e-3 AS moved,
       abs(vector_norm(kv_embed('a calibrated text')) - 1) < 1e-5 AS unit
  FROM regress_calib_vec WHERE label = 'before';
SET kvembed.space_calibration = off;
SELECT space FROM kv_status();
SELECT (v <=> kv_embed('a calibrated text')) < 1e-5 AS same_vector FROM regress_calib_vec WHERE label = 'before';
RESET kvembed.space_calibration;
-- Fitted for the session's settings then: another bias does not use it.
SET kvembed.bias = '1.5';
SELECT space, layers_source FROM kv_status();
INSERT INTO regress_calib_vec VALUES ('bias 1.5', kv_embed('a calibrated text'));
SET kvembed.space_calibration = off;
SELECT (v <=> kv_embed('a calibrated text')) < 1e-5 AS same_as_uncalibrated FROM regress_calib_vec WHERE label = 'bias 1.5';
RESET kvembed.space_calibration;
RESET kvembed.bias;
-- A second selection replaces the first (one calibration per model).
SET client_min_messages = warning;
SELECT count(*) AS layers FROM kv_select_layers('regress_calib', 'body', 12);
RESET client_min_messages;
SELECT count(*) AS calibrations, min(sample_size) AS sample_size FROM kvembed.calibration;
-- Other fits, and none.
SET client_min_messages = warning;
SELECT count(*) AS layers FROM kv_select_layers('regress_calib', 'body', space => 'remove:2');
RESET client_min_messages;
SELECT space_fit, space_gains FROM kvembed.calibration;
SELECT space FROM kv_status();
SET client_min_messages = warning;
SELECT count(*) AS layers FROM kv_select_layers('regress_calib', 'body', space => 'none');
RESET client_min_messages;
SELECT space_fit, space_mean IS NULL AS no_mean FROM kvembed.calibration;
SELECT space FROM kv_status();

-- The agreement rule: a window of three consecutive layers, or none where no
-- re-routing agrees best (which one depends on the sample, so only its shape
-- is checked here), no intrinsic dimension, each scored window's agreement
-- in the stored curve (the 11 windows of SmolLM2's grid, its default window
-- among them), and kvembed.layers = 'auto' uses the choice.
SET client_min_messages = warning;
SELECT count(*) AS layers,
       count(*) FILTER (WHERE selected) IN (0, 3) AS one_window_or_none,
       coalesce(max(layer) FILTER (WHERE selected) - min(layer) FILTER (WHERE selected), 2) = 2 AS consecutive,
       bool_and(intrinsic_dimension IS NULL) AS no_id
  FROM kv_select_layers('regress_calib', 'body', 16, space => 'none', rule => 'agreement');
RESET client_min_messages;
SELECT rule LIKE 'agreement rule on 16 texts: %' AS agreement_rule, sample_size,
       (SELECT count(*) FROM jsonb_array_elements(curve) p WHERE p ? 'agreement') AS windows_scored,
       (SELECT bool_and((p->>'agreement')::float8 > 0) FROM jsonb_array_elements(curve) p
         WHERE p ? 'agreement') AS copies_stand_out,
       (SELECT count(*) FROM jsonb_array_elements(curve) p
         WHERE (p->>'layer')::int = 20 AND p ? 'agreement') AS default_window_scored,
       layers = (SELECT coalesce(layers, '{}') FROM kv_status()) AS auto_uses_it
  FROM kvembed.calibration;

-- Arguments: the sample needs at least 8 non-NULL texts (16 for the
-- agreement rule); sample_size must be positive; the table and column must
-- exist; the rule is twonn or agreement. A sample above
-- kvembed.max_calibration_texts is lowered (with a NOTICE).
CREATE FUNCTION regress_error(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ' ' || SQLERRM;
END
$$;
CREATE TABLE regress_calib_empty (body text);
INSERT INTO regress_calib_empty VALUES (NULL);
SET client_min_messages = warning;
SELECT q AS call, regress_error('SELECT count(*) FROM ' || q) AS result
  FROM (VALUES ('kv_select_layers(''regress_calib'', ''body'', 7, store => false)'),
               ('kv_select_layers(''regress_calib'', ''body'', 0, store => false)'),
               ('kv_select_layers(''regress_calib'', ''body'', NULL, store => false)'),
               ('kv_select_layers(''regress_calib_empty'', ''body'', store => false)'),
               ('kv_select_layers(''regress_calib'', ''no_such_column'', store => false)'),
               ('kv_select_layers(''regress_no_such_table'', ''body'', store => false)'),
               ('kv_select_layers(''regress_calib'', ''body'', store => false, space => ''bogus'')'),
               ('kv_select_layers(''regress_calib'', ''body'', store => false, space => ''whiten:2'')'),
               ('kv_select_layers(''regress_calib'', ''body'', store => false, rule => ''bogus'')'),
               ('kv_select_layers(''regress_calib'', ''body'', store => false, rule => NULL)'),
               ('kv_select_layers(''regress_calib'', ''body'', 12, store => false, rule => ''agreement'')')) AS t(q);
SELECT count(*) AS layers FROM kv_select_layers('regress_calib', 'body', 100000, store => false);
RESET client_min_messages;

-- Deleting the calibration brings back the default window.
DELETE FROM kvembed.calibration;
SELECT layers, layers_source FROM kv_status();

DROP TABLE regress_calib, regress_calib_vec, regress_calib_empty;
DROP FUNCTION regress_error(text);
