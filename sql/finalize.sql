-- kvembed install script, part 2 (runs after the functions pgrx generates):
-- the parts of the SQL API written in SQL and PL/pgSQL, and privileges.

COMMENT ON SCHEMA kvembed IS 'kvembed internals: the stored layer calibration and helper functions';
GRANT USAGE ON SCHEMA kvembed TO PUBLIC;

-- One layer selection per model identity, written by kv_select_layers() and
-- used by kv_embed() while kvembed.layers = 'auto'.
CREATE TABLE kvembed.calibration (
  model_id    text PRIMARY KEY,
  layers      int[] NOT NULL,
  curve       jsonb NOT NULL,
  rule        text,
  source      text,
  sample_size int,
  created_by  name NOT NULL DEFAULT current_user,
  created_at  timestamptz NOT NULL DEFAULT now(),
  -- The corpus calibration of the space fitted on the same sample (NULL:
  -- none): y = normalize(x' + sum_i gains[i] * u_i * (u_i . x')), x' = x - mean,
  -- with u_i the rows of space_directions (gains count x dim, row-major).
  space_fit        text,
  space_options    jsonb,
  space_mean       real[],
  space_directions real[],
  space_gains      real[]
);
COMMENT ON TABLE kvembed.calibration IS 'Layer selections and space calibrations made by kv_select_layers(), one per model';
REVOKE ALL ON kvembed.calibration FROM PUBLIC;
GRANT SELECT ON kvembed.calibration TO PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON kvembed.calibration TO kvembed_admin;
-- pg_dump keeps calibrations (the table belongs to the extension).
SELECT pg_catalog.pg_extension_config_dump('kvembed.calibration', '');

-- kv_status(): one row describing the engine and this session's settings.
CREATE FUNCTION @extschema@.kv_status()
RETURNS TABLE (
  state text, model text, model_id text, architecture text, dim int, n_layers int, device text,
  method text, layers int[], layers_source text, bias real, document_prompt text, query_prompt text,
  max_tokens int, on_overflow text, batch_tokens int, threads int, queue_depth int,
  requests_served bigint, texts_served bigint, tokens_served bigint,
  engine_pid int, supervisor_pid int, engine_restarts bigint, last_exit text, load_error text,
  space text)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT * FROM jsonb_to_record(kvembed.status_json()) AS s(
    state text, model text, model_id text, architecture text, dim int, n_layers int, device text,
    method text, layers int[], layers_source text, bias real, document_prompt text, query_prompt text,
    max_tokens int, on_overflow text, batch_tokens int, threads int, queue_depth int,
    requests_served bigint, texts_served bigint, tokens_served bigint,
    engine_pid int, supervisor_pid int, engine_restarts bigint, last_exit text, load_error text,
    space text)
$$;
COMMENT ON FUNCTION @extschema@.kv_status() IS
  'The engine''s model, device, state and counters, and the session''s effective embedding settings';

-- A jsonb array of numbers as real[] (NULL for a JSON null).
CREATE FUNCTION kvembed.real_array(j jsonb) RETURNS real[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN jsonb_typeof(j) = 'array'
                  THEN ARRAY(SELECT x::real FROM jsonb_array_elements_text(j) WITH ORDINALITY AS e(x, i) ORDER BY i) END $$;

-- kv_select_layers(): choose the re-routing layers for the loaded model from
-- the intrinsic dimension (TwoNN) of a sample of a column, fit the corpus
-- calibration of the space on the same sample (space => 'none' skips it),
-- store both, and return the per-layer curve. Reads the table with the caller's
-- privileges (row-level security applies); names are quoted by regclass
-- output and %I.
CREATE FUNCTION @extschema@.kv_select_layers(
  tbl regclass, col name, sample_size int DEFAULT 1024, store boolean DEFAULT true,
  space text DEFAULT 'whiten')
RETURNS TABLE (layer int, intrinsic_dimension float8, selected bool)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  texts text[];
  n int;
  result jsonb;
  started timestamptz := clock_timestamp();
  source text := format('%s.%I', tbl, col);
  max_texts int := current_setting('kvembed.max_calibration_texts')::int;
BEGIN
  IF sample_size IS NULL OR sample_size < 1 THEN
    RAISE EXCEPTION 'kv_select_layers: sample_size must be positive, got %', sample_size
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT has_function_privilege('kvembed.select_layers_raw(text[], integer, real, text)', 'EXECUTE') THEN
    RAISE EXCEPTION 'kv_select_layers: permission denied to run a layer selection'
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'A layer selection holds the shared engine for minutes and its memory grows with the square of the sample: superusers and members of kvembed_admin run it.';
  END IF;
  IF sample_size > max_texts THEN
    RAISE NOTICE 'kv_select_layers: sample_size % is above kvembed.max_calibration_texts; sampling % texts',
      sample_size, max_texts;
    sample_size := max_texts;
  END IF;
  IF store AND NOT (has_table_privilege('kvembed.calibration', 'INSERT')
                    AND has_table_privilege('kvembed.calibration', 'UPDATE')) THEN
    RAISE EXCEPTION 'kv_select_layers: permission denied to store a calibration'
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Superusers and members of kvembed_admin store calibrations; pass store => false to only compute the curve.';
  END IF;

  RAISE NOTICE 'kv_select_layers: sampling up to % non-null values of %', sample_size, source;
  EXECUTE format(
    'SELECT array_agg(v) FROM (SELECT %1$I::text AS v FROM %2$s WHERE %1$I IS NOT NULL ORDER BY random() LIMIT %3$s) s',
    col, tbl, sample_size)
  INTO texts;
  n := coalesce(cardinality(texts), 0);
  IF n = 0 THEN
    RAISE EXCEPTION 'kv_select_layers: % has no non-null values to sample', source
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  RAISE NOTICE 'kv_select_layers: running the model over % texts and measuring every layer', n;
  result := kvembed.select_layers_raw(texts, space => space);
  RAISE NOTICE 'kv_select_layers: selected layers % (%) in % s', result->'selected', result->>'rule',
    round(extract(epoch FROM clock_timestamp() - started)::numeric, 1);
  IF jsonb_typeof(result->'space') = 'object' THEN
    RAISE NOTICE 'kv_select_layers: fitted the space calibration % (% directions) for this session''s method, bias and document prompt',
      result->'space'->>'fit', jsonb_array_length(result->'space'->'gains');
  END IF;

  IF store THEN
    INSERT INTO kvembed.calibration AS c (model_id, layers, curve, rule, source, sample_size,
                                          space_fit, space_options, space_mean, space_directions, space_gains)
    VALUES (result->>'model_id',
            ARRAY(SELECT jsonb_array_elements_text(result->'selected')::int),
            result->'curve', result->>'rule', source, n,
            result->'space'->>'fit', result->'space'->'options',
            kvembed.real_array(result->'space'->'mean'),
            kvembed.real_array(result->'space'->'directions'),
            kvembed.real_array(result->'space'->'gains'))
    ON CONFLICT (model_id) DO UPDATE
      SET layers = EXCLUDED.layers, curve = EXCLUDED.curve, rule = EXCLUDED.rule,
          source = EXCLUDED.source, sample_size = EXCLUDED.sample_size,
          space_fit = EXCLUDED.space_fit, space_options = EXCLUDED.space_options,
          space_mean = EXCLUDED.space_mean, space_directions = EXCLUDED.space_directions,
          space_gains = EXCLUDED.space_gains,
          created_by = current_user, created_at = now();
    RAISE NOTICE 'kv_select_layers: stored for model %; kv_embed uses it while kvembed.layers = ''auto''',
      result->>'model_id';
  END IF;

  RETURN QUERY
    SELECT (p->>'layer')::int, (p->>'intrinsic_dimension')::float8, (p->>'selected')::bool
    FROM jsonb_array_elements(result->'curve') AS p
    ORDER BY 1;
END
$fn$;
COMMENT ON FUNCTION @extschema@.kv_select_layers(regclass, name, int, boolean, text) IS
  'Selects the re-routing layers by TwoNN intrinsic dimension on a sample of a column, fits the space calibration on it, and stores both';

-- kv_backfill(): fill NULL embeddings of an existing table in batches,
-- committing after each batch (so it must be CALLed outside a transaction
-- block) and reporting progress. Safe to interrupt and re-run; rows locked
-- by others are skipped and picked up by a later batch or run.
CREATE PROCEDURE @extschema@.kv_backfill(
  tbl regclass, text_col name, vec_col name, batch_size int DEFAULT 256)
LANGUAGE plpgsql
AS $fn$
DECLARE
  total bigint;
  done bigint := 0;
  n bigint;
  started timestamptz := pg_catalog.clock_timestamp();
  secs float8;
BEGIN
  IF batch_size IS NULL OR batch_size < 1 THEN
    RAISE EXCEPTION 'kv_backfill: batch_size must be positive, got %', batch_size
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE pg_catalog.format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL',
                            tbl, vec_col, text_col)
    INTO total;
  RAISE NOTICE 'kv_backfill: % rows of % to embed', total, tbl;
  -- A row is (tableoid, ctid): ctids repeat across the partitions of a
  -- partitioned table and the children of an inherited one. The UPDATE
  -- re-checks that the vector is still NULL.
  LOOP
    EXECUTE pg_catalog.format($q$
      WITH batch AS (
        SELECT tableoid AS rel, ctid AS tid, %2$I::text AS t FROM %1$s
        WHERE %3$I IS NULL AND %2$I IS NOT NULL
        LIMIT %4$s FOR UPDATE SKIP LOCKED),
      packed AS (SELECT array_agg(rel) AS rels, array_agg(tid) AS tids, array_agg(t) AS ts FROM batch),
      embedded AS (
        SELECT e.rel, e.tid, e.v
        FROM packed, unnest(packed.rels, packed.tids, @extschema@.kv_embed_batch(packed.ts)) AS e(rel, tid, v)
        WHERE packed.tids IS NOT NULL)
      UPDATE %1$s AS x SET %3$I = embedded.v FROM embedded
      WHERE x.tableoid = embedded.rel AND x.ctid = embedded.tid AND x.%3$I IS NULL
    $q$, tbl, text_col, vec_col, batch_size);
    GET DIAGNOSTICS n = ROW_COUNT;
    EXIT WHEN n = 0;
    done := done + n;
    COMMIT;
    secs := extract(epoch FROM pg_catalog.clock_timestamp() - started);
    RAISE NOTICE 'kv_backfill: %/% rows (% rows/s)', done, total,
      round((done / greatest(secs, 0.001))::numeric, 1);
  END LOOP;
  RAISE NOTICE 'kv_backfill: done, % rows embedded in % s', done,
    round(extract(epoch FROM pg_catalog.clock_timestamp() - started)::numeric, 1);
END
$fn$;
COMMENT ON PROCEDURE @extschema@.kv_backfill(regclass, name, name, int) IS
  'Embeds the NULL vectors of a table in batches, committing and reporting progress as it goes';

-- Only superusers and kvembed_admin restart the engine.
-- A layer selection costs the shared engine minutes and memory that grows
-- with the square of its sample: not for every role.
REVOKE EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real, text) TO kvembed_admin;
REVOKE EXECUTE ON FUNCTION @extschema@.kv_restart() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.kv_restart() TO kvembed_admin;
REVOKE EXECUTE ON FUNCTION @extschema@.kv_debug_fault(text) FROM PUBLIC;

-- kvembed.stats: the engine's metrics per database and role since the engine
-- started or kv_stats_reset() (superusers and kvembed_admin): requests,
-- texts, tokens, errors by SQLSTATE, time queued and in forward passes,
-- batch fill. For monitoring, e.g. with postgres_exporter.
CREATE VIEW kvembed.stats AS
  SELECT database, role, requests, texts, tokens, errors,
         queue_wait_p50_ms, queue_wait_p99_ms, inference_p50_ms, inference_p99_ms,
         batch_fill, pg_catalog.to_timestamp(since_epoch) AS since
    FROM kvembed.engine_stats();
GRANT SELECT ON kvembed.stats TO PUBLIC;
REVOKE EXECUTE ON FUNCTION @extschema@.kv_stats_reset() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.kv_stats_reset() TO kvembed_admin;

-- Embedding profiles: named, frozen embedding settings, made from a
-- session's settings by kv_create_profile() (superusers and kvembed_admin)
-- and used by kv_embed(text, role, profile) and kvembed.profile. Frozen: no
-- role may UPDATE a row; a new definition takes a new name.
CREATE TABLE kvembed.profiles (
  name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$'),
  model_id text NOT NULL,
  fingerprint text NOT NULL,
  options jsonb NOT NULL,
  space_fit text,
  space_mean real[],
  space_directions real[],
  space_gains real[],
  created_by name NOT NULL DEFAULT current_user,
  created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('kvembed.profiles', '');
REVOKE ALL ON kvembed.profiles FROM PUBLIC;
GRANT SELECT ON kvembed.profiles TO PUBLIC;
GRANT SELECT, INSERT, DELETE ON kvembed.profiles TO kvembed_admin;

-- Every profile, with the generated columns of this database that embed
-- under it (the profile named as a literal in a kv_embed* call of the
-- column's expression); NULL table and column for a profile no column uses.
CREATE VIEW kvembed.profile_columns AS
  SELECT p.name AS profile, p.model_id, p.fingerprint, p.options->>'method' AS method, p.created_at,
         u.table_name, u.column_name
    FROM kvembed.profiles AS p
    LEFT JOIN (
      SELECT pg_catalog.replace(m[1], '''''', '''') AS profile,
             c.oid::regclass AS table_name, a.attname AS column_name
        FROM pg_catalog.pg_attrdef AS d
        JOIN pg_catalog.pg_class AS c ON c.oid = d.adrelid
        JOIN pg_catalog.pg_attribute AS a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        CROSS JOIN LATERAL pg_catalog.pg_get_expr(d.adbin, d.adrelid) AS e(expr)
        CROSS JOIN LATERAL pg_catalog.regexp_matches(e.expr, '''((?:[^'']|'''')*)''::text', 'g') AS m
       WHERE a.attgenerated = 's' AND e.expr LIKE '%kv\_embed%') AS u ON u.profile = p.name;
GRANT SELECT ON kvembed.profile_columns TO PUBLIC;

-- kv_create_profile(): freeze this session's embedding settings (kvembed.*,
-- the stored calibration's layers and space map where they apply) for the
-- loaded model under a name; returns the frozen options.
CREATE FUNCTION @extschema@.kv_create_profile(profile text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  p jsonb;
BEGIN
  IF NOT has_table_privilege('kvembed.profiles', 'INSERT') THEN
    RAISE EXCEPTION 'kv_create_profile: creating a profile needs kvembed_admin or a superuser'
      USING ERRCODE = '42501',
            HINT = 'A superuser can GRANT kvembed_admin TO ' || quote_ident(current_user) || '.';
  END IF;
  IF profile !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$' THEN
    RAISE EXCEPTION 'kv_create_profile: invalid profile name %', quote_literal(profile)
      USING ERRCODE = '22023',
            HINT = 'Letters, digits, _ . : - (not first), at most 63 characters.';
  END IF;
  p := kvembed.session_profile();
  BEGIN
    INSERT INTO kvembed.profiles (name, model_id, fingerprint, options, space_fit, space_mean, space_directions, space_gains)
    VALUES (profile, p->>'model_id', p->>'fingerprint', p->'options', p->'space'->>'fit',
            kvembed.real_array(p->'space'->'mean'), kvembed.real_array(p->'space'->'directions'),
            kvembed.real_array(p->'space'->'gains'));
  EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'kv_create_profile: profile % exists', quote_literal(profile)
      USING ERRCODE = '42710',
            HINT = 'Profiles are frozen: choose a new name (and re-embed under it), or kv_drop_profile() this one.';
  END;
  RETURN p->'options';
END
$fn$;
COMMENT ON FUNCTION @extschema@.kv_create_profile(text) IS
  'Freezes this session''s embedding settings for the loaded model under a name, for kv_embed(text, role, profile)';

-- kv_drop_profile(): refuses while a generated column embeds under it,
-- unless force.
CREATE FUNCTION @extschema@.kv_drop_profile(profile text, force boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  users text;
BEGIN
  IF NOT has_table_privilege('kvembed.profiles', 'DELETE') THEN
    RAISE EXCEPTION 'kv_drop_profile: dropping a profile needs kvembed_admin or a superuser'
      USING ERRCODE = '42501';
  END IF;
  SELECT string_agg(format('%s.%I', table_name, column_name), ', ') INTO users
    FROM kvembed.profile_columns
   WHERE profile_columns.profile = kv_drop_profile.profile AND table_name IS NOT NULL;
  IF users IS NOT NULL AND NOT force THEN
    RAISE EXCEPTION 'kv_drop_profile: generated columns embed under profile %: %', quote_literal(profile), users
      USING ERRCODE = '2BP01',
            HINT = 'Their next INSERT or UPDATE would fail. Drop or change those columns first, or pass force => true.';
  END IF;
  DELETE FROM kvembed.profiles WHERE name = profile;
  RETURN FOUND;
END
$fn$;
