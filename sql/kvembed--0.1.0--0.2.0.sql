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
REVOKE EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real) TO kvembed_admin;

CREATE OR REPLACE FUNCTION @extschema@.kv_select_layers(
  tbl regclass, col name, sample_size int DEFAULT 512, store boolean DEFAULT true)
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
  IF NOT has_function_privilege('kvembed.select_layers_raw(text[], integer, real)', 'EXECUTE') THEN
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
  result := kvembed.select_layers_raw(texts);
  RAISE NOTICE 'kv_select_layers: selected layers % (%) in % s', result->'selected', result->>'rule',
    round(extract(epoch FROM clock_timestamp() - started)::numeric, 1);

  IF store THEN
    INSERT INTO kvembed.calibration AS c (model_id, layers, curve, rule, source, sample_size)
    VALUES (result->>'model_id',
            ARRAY(SELECT jsonb_array_elements_text(result->'selected')::int),
            result->'curve', result->>'rule', source, n)
    ON CONFLICT (model_id) DO UPDATE
      SET layers = EXCLUDED.layers, curve = EXCLUDED.curve, rule = EXCLUDED.rule,
          source = EXCLUDED.source, sample_size = EXCLUDED.sample_size,
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
