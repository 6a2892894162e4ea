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
