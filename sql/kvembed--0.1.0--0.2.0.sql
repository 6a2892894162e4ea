-- kvembed 0.1.0 -> 0.2.0 (ALTER EXTENSION kvembed UPDATE TO '0.2.0')
--
-- New in 0.2.0:
-- * kv_debug_fault(text): fault injection for fault-isolation testing,
--   superusers only;
-- * the kvembed.engine_memory_limit setting, which kvembed_admin may change
--   with ALTER SYSTEM like the other engine settings.
-- Fixed in 0.2.0:
-- * kv_backfill identifies a row by (tableoid, ctid): on partitioned and
--   inherited tables, whose ctids repeat, 0.1.0 could store one row's vector
--   in another's.
-- * an ordinary role can no longer make one request cost the shared engine
--   more than the administrator allows: kvembed.max_tokens_limit caps every
--   session's kvembed.max_tokens, kvembed.max_calibration_texts the sample
--   of a layer selection (both changed by kvembed_admin with ALTER SYSTEM),
--   and kvembed.select_layers_raw (so kv_select_layers) is for superusers
--   and kvembed_admin only.
-- * kv_select_layers also fits a corpus calibration of the embedding space
--   on its sample (space => 'whiten', the default; 'center', 'remove:K',
--   'none'), stored in kvembed.calibration and applied by kv_embed while
--   kvembed.layers = 'auto' and kvembed.space_calibration is on; kv_status
--   reports it in its new space column; its sample_size defaults to 1024.
-- * kv_chunk(text, max_tokens, overlap): token-aware chunking with the
--   loaded model's tokenizer.
-- * kvembed.stats: the engine's metrics per database and role, and
--   kv_stats_reset() (superusers and kvembed_admin).
-- * embedding profiles: kvembed.profiles, kv_create_profile(),
--   kv_drop_profile(), kvembed.profile_columns, kv_embed(text, role,
--   profile) and its _half and _batch forms, the kvembed.profile setting.
-- Every other object is unchanged. The 0.2.0 library serves both versions'
-- functions (no C symbol was renamed or removed).

CREATE FUNCTION @extschema@."kv_debug_fault"(
	"kind" TEXT /* &str */
) RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_debug_fault_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.kv_debug_fault(text) FROM PUBLIC;

GRANT ALTER SYSTEM ON PARAMETER kvembed.engine_memory_limit TO kvembed_admin;

CREATE OR REPLACE PROCEDURE @extschema@.kv_backfill(
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

GRANT ALTER SYSTEM ON PARAMETER kvembed.max_tokens_limit, kvembed.max_calibration_texts TO kvembed_admin;
DROP FUNCTION kvembed.select_layers_raw(text[], integer, real);
CREATE  FUNCTION kvembed."select_layers_raw"(
	"texts" text[], /* Array < '_, DbText > */
	"window" INT DEFAULT NULL, /* Option < i32 > */
	"skip_fraction" real DEFAULT NULL, /* Option < f32 > */
	"space" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'select_layers_raw_wrapper';
REVOKE EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real, text) TO kvembed_admin;

-- kv_select_layers gains the space argument (a new signature), kv_status
-- the space column, the calibration table the space calibration.
ALTER TABLE kvembed.calibration
  ADD COLUMN IF NOT EXISTS space_fit text,
  ADD COLUMN IF NOT EXISTS space_options jsonb,
  ADD COLUMN IF NOT EXISTS space_mean real[],
  ADD COLUMN IF NOT EXISTS space_directions real[],
  ADD COLUMN IF NOT EXISTS space_gains real[];
COMMENT ON TABLE kvembed.calibration IS 'Layer selections and space calibrations made by kv_select_layers(), one per model';

-- A jsonb array of numbers as real[] (NULL for a JSON null).
CREATE FUNCTION kvembed.real_array(j jsonb) RETURNS real[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN jsonb_typeof(j) = 'array'
                  THEN ARRAY(SELECT x::real FROM jsonb_array_elements_text(j) WITH ORDINALITY AS e(x, i) ORDER BY i) END $$;

DROP FUNCTION @extschema@.kv_status();
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

DROP FUNCTION @extschema@.kv_select_layers(regclass, name, int, boolean);
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

-- kv_chunk() is new.
CREATE FUNCTION @extschema@."kv_chunk"(
	"input" text, /* DbText */
	"max_tokens" INT DEFAULT 256, /* i32 */
	"overlap" INT DEFAULT 32 /* i32 */
) RETURNS TABLE (
	"ord" INT,  /* i32 */
	"chunk" text,  /* DbTextOut */
	"start_char" INT,  /* i32 */
	"end_char" INT,  /* i32 */
	"tokens" INT  /* i32 */
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_chunk_wrapper';

-- The engine's metrics are new.
CREATE FUNCTION kvembed."engine_stats"() RETURNS TABLE (
	"database" text,  /* DbTextOut */
	"role" text,  /* DbTextOut */
	"requests" bigint,  /* i64 */
	"texts" bigint,  /* i64 */
	"tokens" bigint,  /* i64 */
	"errors" jsonb,  /* JsonB */
	"queue_wait_p50_ms" double precision,  /* f64 */
	"queue_wait_p99_ms" double precision,  /* f64 */
	"inference_p50_ms" double precision,  /* f64 */
	"inference_p99_ms" double precision,  /* f64 */
	"batch_fill" double precision,  /* f64 */
	"since_epoch" double precision  /* f64 */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'engine_stats_wrapper';
CREATE FUNCTION @extschema@."kv_stats_reset"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_stats_reset_wrapper';

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

-- Embedding profiles are new.
CREATE FUNCTION @extschema@."kv_embed"(
	"input" text, /* DbText */
	"role" text, /* DbText */
	"profile" text /* DbText */
) RETURNS vector /* Vector */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_embed_profile_wrapper';
CREATE FUNCTION @extschema@."kv_embed_half"(
	"input" text, /* DbText */
	"role" text, /* DbText */
	"profile" text /* DbText */
) RETURNS halfvec /* HalfVec */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_embed_half_profile_wrapper';
CREATE FUNCTION @extschema@."kv_embed_batch"(
	"inputs" text[], /* Array < '_, DbText > */
	"role" text, /* DbText */
	"profile" text /* DbText */
) RETURNS vector[] /* Vec < Option < Vector > > */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_embed_batch_profile_wrapper';
CREATE FUNCTION kvembed."session_profile"() RETURNS jsonb /* JsonB */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'session_profile_wrapper';

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
