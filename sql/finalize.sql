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
-- a sample of a column (rule 'twonn': its intrinsic dimension per layer;
-- 'agreement': the window whose embeddings best tell each text's perturbed
-- copy from the others', each layer's row carrying no ID), fit the corpus
-- calibration of the space on the same sample (space => 'none' skips it),
-- store both, and return the per-layer curve. Reads the table with the caller's
-- privileges (row-level security applies); names are quoted by regclass
-- output and %I.
CREATE FUNCTION @extschema@.kv_select_layers(
  tbl regclass, col name, sample_size int DEFAULT 1024, store boolean DEFAULT true,
  space text DEFAULT 'whiten', rule text DEFAULT 'twonn')
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
  IF rule IS NULL OR lower(rule) NOT IN ('twonn', 'agreement') THEN
    RAISE EXCEPTION 'kv_select_layers: unknown rule %', coalesce(quote_literal(rule), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use ''twonn'' (the intrinsic dimension, the default) or ''agreement'' (the window whose embeddings best tell each text''s perturbed copy from the others'').';
  END IF;
  IF NOT has_function_privilege('kvembed.select_layers_raw(text[], integer, real, text, text)', 'EXECUTE') THEN
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

  IF lower(rule) = 'agreement' THEN
    RAISE NOTICE 'kv_select_layers: scoring re-routing windows by agreement, running the model twice over % texts per window', n;
  ELSE
    RAISE NOTICE 'kv_select_layers: running the model over % texts and measuring every layer', n;
  END IF;
  result := kvembed.select_layers_raw(texts, space => space, rule => rule);
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
COMMENT ON FUNCTION @extschema@.kv_select_layers(regclass, name, int, boolean, text, text) IS
  'Selects the re-routing layers on a sample of a column (rule twonn: TwoNN intrinsic dimension; agreement: the window that best tells each text''s perturbed copy from the others''), fits the space calibration on it, and stores both';

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
  -- kvembed.embed_pending: one batch (the queue worker's query, as this
  -- user): rows locked by others are skipped, vectors still NULL written.
  LOOP
    n := kvembed.embed_pending(tbl, text_col, vec_col, batch_size);
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
REVOKE EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kvembed.select_layers_raw(text[], integer, real, text, text) TO kvembed_admin;
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

-- The asynchronous embedding queue (src/queue.rs): kv_vectorize() makes a
-- table's vectors fill in the background. A row is pending while its vector
-- is NULL and its text is not; the table's kvembed_vectorize trigger clears
-- the vector when the text changes, and is the registration: its arguments
-- are (text column, vector column, profile or '', batch size).
CREATE FUNCTION kvembed.vectorize_trigger() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  n jsonb;
  o jsonb;
BEGIN
  n := to_jsonb(NEW);
  o := to_jsonb(OLD);
  -- A new text makes the row pending, unless the same statement also set
  -- the vector.
  IF n->TG_ARGV[0] IS DISTINCT FROM o->TG_ARGV[0] AND n->TG_ARGV[1] IS NOT DISTINCT FROM o->TG_ARGV[1] THEN
    NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[1], NULL));
  END IF;
  RETURN NEW;
END
$fn$;

-- Every vectorized table of this database (partitions inherit their
-- parent's trigger and are not listed).
CREATE FUNCTION kvembed.vectorize_tables(
  OUT relid oid, OUT text_col name, OUT vec_col name, OUT profile text, OUT batch_size int, OUT owner oid)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
  SELECT t.tgrelid, a[1]::name, a[2]::name, nullif(a[3], ''), a[4]::int, c.relowner
    FROM pg_trigger AS t
    JOIN pg_class AS c ON c.oid = t.tgrelid
    CROSS JOIN LATERAL (
      SELECT array_agg(replace(x, '\\', '\') ORDER BY i)
        FROM unnest(string_to_array(encode(t.tgargs, 'escape'), '\000')) WITH ORDINALITY AS u(x, i)) AS args(a)
   WHERE t.tgname = 'kvembed_vectorize'
     AND t.tgfoid = 'kvembed.vectorize_trigger()'::regprocedure
     AND t.tgnargs = 4
     AND NOT EXISTS (SELECT 1 FROM pg_inherits AS i JOIN pg_trigger AS p ON p.tgrelid = i.inhparent
                      WHERE i.inhrelid = t.tgrelid AND p.tgname = 'kvembed_vectorize')
$fn$;

-- What the queue worker did per table, and the rows it gave up on (a
-- single-row batch failed with a data error: skipped until the text
-- changes). Not dumped: runtime state.
CREATE TABLE kvembed.vectorize_state (
  relid oid PRIMARY KEY,
  embedded bigint NOT NULL DEFAULT 0,
  busy_seconds float8 NOT NULL DEFAULT 0,
  batches bigint NOT NULL DEFAULT 0,
  last_batch_at timestamptz,
  errors bigint NOT NULL DEFAULT 0,
  last_error text,
  last_error_sqlstate text,
  last_error_at timestamptz
);
REVOKE ALL ON kvembed.vectorize_state FROM PUBLIC;
CREATE TABLE kvembed.vectorize_failures (
  relid oid NOT NULL,
  rel oid NOT NULL,
  tid tid NOT NULL,
  text_hash text NOT NULL,
  sqlstate text NOT NULL,
  message text NOT NULL,
  failed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (relid, rel, tid)
);
REVOKE ALL ON kvembed.vectorize_failures FROM PUBLIC;
-- (transaction id, time) samples taken by the worker, to tell the age of
-- the oldest pending row from its xmin: one slot per 10 s over a day.
CREATE TABLE kvembed.vectorize_clock (
  slot int PRIMARY KEY,
  xid bigint NOT NULL,
  at timestamptz NOT NULL
);
REVOKE ALL ON kvembed.vectorize_clock FROM PUBLIC;
GRANT SELECT ON kvembed.vectorize_clock TO PUBLIC;

CREATE FUNCTION kvembed.vectorize_clock_tick() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
  INSERT INTO kvembed.vectorize_clock (slot, xid, at)
  VALUES ((floor(extract(epoch FROM now()) / 10)::bigint % 8640)::int,
          pg_current_xact_id()::text::bigint, now())
  ON CONFLICT (slot) DO UPDATE SET xid = EXCLUDED.xid, at = EXCLUDED.at;
  -- The state of tables no longer vectorized (or dropped).
  DELETE FROM kvembed.vectorize_state AS s
   WHERE s.relid NOT IN (SELECT v.relid FROM kvembed.vectorize_tables() AS v);
  DELETE FROM kvembed.vectorize_failures AS f
   WHERE f.relid NOT IN (SELECT v.relid FROM kvembed.vectorize_tables() AS v);
$fn$;
REVOKE EXECUTE ON FUNCTION kvembed.vectorize_clock_tick() FROM PUBLIC;

-- One step of the queue worker for one table (superusers: the worker): a
-- batch as the table's owner; on a data error, the rows one by one, those
-- that still fail set aside; every outcome recorded. Returns the rows
-- embedded, -1 when the batch failed for another reason (the engine is
-- down, a setting is wrong): the worker backs off and retries.
CREATE FUNCTION kvembed.vectorize_work(relid oid) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  cfg record;
  n bigint := 0;
  started timestamptz := clock_timestamp();
  st text;
  msg text;
  r record;
BEGIN
  -- An unexpected error (a bug, a damaged table) fails this table's step,
  -- never the worker: it is logged and the table retried with backoff.
  BEGIN
    SELECT * INTO cfg FROM kvembed.vectorize_tables() AS v WHERE v.relid = vectorize_work.relid;
    IF NOT FOUND THEN
      RETURN 0;
    END IF;
    INSERT INTO kvembed.vectorize_state AS s (relid) VALUES (relid)
      ON CONFLICT ON CONSTRAINT vectorize_state_pkey DO NOTHING;
    BEGIN
      n := kvembed.vectorize_batch(relid);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    END;
    IF st IS NOT NULL AND left(st, 2) IN ('22', '54') THEN
      -- A text the engine refuses: find it, embed the others.
      st := NULL;
      n := 0;
      FOR r IN EXECUTE format(
          'SELECT x.tableoid AS rel, x.ctid AS tid, md5(x.%1$I::text) AS h FROM %2$s AS x
            WHERE x.%3$I IS NULL AND x.%1$I IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM kvembed.vectorize_failures AS f
                               WHERE f.relid = %4$s AND f.rel = x.tableoid AND f.tid = x.ctid)
            LIMIT %5$s', cfg.text_col, relid::regclass, cfg.vec_col, relid, cfg.batch_size)
      LOOP
        BEGIN
          n := n + kvembed.vectorize_batch(relid, r.rel, r.tid::text);
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
          IF left(st, 2) NOT IN ('22', '54') THEN
            EXIT;
          END IF;
          INSERT INTO kvembed.vectorize_failures AS f (relid, rel, tid, text_hash, sqlstate, message)
          VALUES (relid, r.rel, r.tid, r.h, st, msg)
          ON CONFLICT ON CONSTRAINT vectorize_failures_pkey DO UPDATE
            SET text_hash = EXCLUDED.text_hash, sqlstate = EXCLUDED.sqlstate,
                message = EXCLUDED.message, failed_at = EXCLUDED.failed_at;
          UPDATE kvembed.vectorize_state AS s
             SET errors = s.errors + 1, last_error = msg, last_error_sqlstate = st, last_error_at = now()
           WHERE s.relid = vectorize_work.relid;
          st := NULL;
        END;
      END LOOP;
    END IF;
    IF st IS NOT NULL THEN
      UPDATE kvembed.vectorize_state AS s
         SET errors = s.errors + 1, last_error = msg, last_error_sqlstate = st, last_error_at = now()
       WHERE s.relid = vectorize_work.relid;
      RETURN -1;
    END IF;
    IF n > 0 THEN
      UPDATE kvembed.vectorize_state AS s
         SET embedded = s.embedded + n, batches = s.batches + 1, last_batch_at = now(),
             busy_seconds = s.busy_seconds + extract(epoch FROM clock_timestamp() - started)
       WHERE s.relid = vectorize_work.relid;
    ELSIF EXISTS (SELECT 1 FROM kvembed.vectorize_failures AS f WHERE f.relid = vectorize_work.relid) THEN
      -- The queue is empty: forget the set-aside rows that were since
      -- embedded, changed or deleted.
      EXECUTE format(
        'DELETE FROM kvembed.vectorize_failures AS f WHERE f.relid = %1$s AND NOT EXISTS (
           SELECT 1 FROM %2$s AS x WHERE x.tableoid = f.rel AND x.ctid = f.tid
              AND x.%3$I IS NULL AND md5(x.%4$I::text) = f.text_hash)',
        relid, relid::regclass, cfg.vec_col, cfg.text_col);
    END IF;
    RETURN n;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RAISE WARNING 'kvembed queue: table %: %', relid, msg;
    RETURN -1;
  END;
END
$fn$;
REVOKE EXECUTE ON FUNCTION kvembed.vectorize_work(oid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION kvembed.vectorize_batch(oid, oid, text) FROM PUBLIC;

-- Pending rows of a vectorized table and the age of the oldest (from its
-- xmin and the worker's clock: accurate to about 10 s), for a role that
-- may read the table; NULLs otherwise.
CREATE FUNCTION kvembed.vectorize_backlog(
  relid oid, text_col name, vec_col name, OUT pending bigint, OUT oldest_pending_age interval)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  oldest_age bigint;
  oldest_xid bigint;
  since timestamptz;
BEGIN
  IF NOT has_table_privilege(relid, 'SELECT') THEN
    RETURN;
  END IF;
  EXECUTE format('SELECT count(*), max(age(xmin)) FROM %s WHERE %I IS NULL AND %I IS NOT NULL',
                 relid::regclass, vec_col, text_col)
    INTO pending, oldest_age;
  IF pending = 0 THEN
    oldest_pending_age := interval '0';
    RETURN;
  END IF;
  oldest_xid := pg_snapshot_xmax(pg_current_snapshot())::text::bigint - oldest_age;
  SELECT c.at INTO since FROM kvembed.vectorize_clock AS c
   WHERE c.xid <= oldest_xid ORDER BY c.xid DESC LIMIT 1;
  IF since IS NULL THEN
    -- Older than every sample (or no sample yet): at least this old.
    SELECT min(c.at) INTO since FROM kvembed.vectorize_clock AS c;
  END IF;
  oldest_pending_age := date_trunc('second', now() - since);
END
$fn$;

-- kvembed.vectorized: every vectorized table this role may read, with its
-- queue: pending rows, the oldest's age, rows embedded and the rate while
-- draining, rows set aside, the last error.
CREATE VIEW kvembed.vectorized AS
  SELECT v.relid::regclass AS table_name, v.text_col, v.vec_col, v.profile, v.batch_size,
         b.pending, b.oldest_pending_age,
         coalesce(s.embedded, 0) AS embedded,
         CASE WHEN s.busy_seconds > 0 THEN round((s.embedded / s.busy_seconds)::numeric, 1) END AS rows_per_second,
         s.last_batch_at,
         (SELECT count(*) FROM kvembed.vectorize_failures AS f WHERE f.relid = v.relid) AS failed_rows,
         s.last_error, s.last_error_sqlstate, s.last_error_at
    FROM kvembed.vectorize_tables() AS v
    CROSS JOIN LATERAL kvembed.vectorize_backlog(v.relid, v.text_col, v.vec_col) AS b
    LEFT JOIN kvembed.vectorize_state AS s ON s.relid = v.relid
   WHERE pg_catalog.has_table_privilege(v.relid, 'SELECT');
GRANT SELECT ON kvembed.vectorized TO PUBLIC;

-- kv_vectorize(): from now on the table's vectors fill in the background.
-- Creates the vector column when it does not exist (the model's dimension),
-- the trigger and a partial index of the pending rows, starts the worker,
-- and returns the number of rows pending now. The table's owner only.
CREATE FUNCTION @extschema@.kv_vectorize(
  tbl regclass, text_col name, vec_col name, profile text DEFAULT NULL, batch_size int DEFAULT 256)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  rel record;
  t_type regtype;
  v_type regtype;
  v_generated "char";
  dims int;
  pending bigint;
  profile_name text := coalesce(profile, nullif(current_setting('kvembed.profile', true), ''));
  index_name text;
  part regclass;
BEGIN
  IF tbl IS NULL OR text_col IS NULL OR vec_col IS NULL THEN
    RAISE EXCEPTION 'kv_vectorize: table, text column and vector column are required'
      USING ERRCODE = '22004';
  END IF;
  SELECT c.relkind, c.relowner, c.relname, n.nspname INTO rel
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = tbl;
  IF rel.relkind NOT IN ('r', 'p') THEN
    RAISE EXCEPTION 'kv_vectorize: % is not a table', tbl USING ERRCODE = '42809';
  END IF;
  IF NOT pg_has_role(rel.relowner, 'USAGE') THEN
    RAISE EXCEPTION 'kv_vectorize: must be the owner of table %', tbl USING ERRCODE = '42501';
  END IF;
  IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 4096 THEN
    RAISE EXCEPTION 'kv_vectorize: batch_size must be between 1 and 4096, got %', batch_size
      USING ERRCODE = '22023';
  END IF;
  IF profile_name IS NOT NULL AND NOT EXISTS (SELECT 1 FROM kvembed.profiles AS p WHERE p.name = profile_name) THEN
    RAISE EXCEPTION 'kv_vectorize: profile % does not exist', quote_literal(profile_name)
      USING ERRCODE = '42704',
            HINT = 'SELECT name FROM kvembed.profiles lists them; kv_create_profile() makes one.';
  END IF;
  -- The queue worker has no session settings: without a profile it embeds
  -- with kvembed.model, which is not what a session on another model means.
  IF profile_name IS NULL AND nullif(current_setting('kvembed.use_model', true), '') IS NOT NULL THEN
    RAISE EXCEPTION 'kv_vectorize: without a profile the queue embeds with kvembed.model, not with this session''s kvembed.use_model = %',
        quote_literal(current_setting('kvembed.use_model'))
      USING ERRCODE = '22023',
            HINT = 'Make a profile on that model (kv_create_profile() in this session) and pass it: a profile names its model.';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_trigger AS t WHERE t.tgrelid = tbl AND t.tgname = 'kvembed_vectorize') THEN
    RAISE EXCEPTION 'kv_vectorize: % is vectorized already', tbl
      USING ERRCODE = '42710', HINT = 'kv_unvectorize() it first to change its settings.';
  END IF;
  SELECT a.atttypid::regtype INTO t_type FROM pg_attribute AS a
   WHERE a.attrelid = tbl AND a.attname = text_col AND a.attnum > 0 AND NOT a.attisdropped;
  IF t_type IS NULL THEN
    RAISE EXCEPTION 'kv_vectorize: column % of % does not exist', quote_ident(text_col), tbl
      USING ERRCODE = '42703';
  END IF;
  IF (SELECT CASE WHEN t.typbasetype <> 0 THEN t.typbasetype ELSE t.oid END FROM pg_type AS t WHERE t.oid = t_type)
     NOT IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype) THEN
    RAISE EXCEPTION 'kv_vectorize: column % of % is %, not text', quote_ident(text_col), tbl, t_type
      USING ERRCODE = '42804';
  END IF;
  SELECT a.atttypid::regtype, a.attgenerated INTO v_type, v_generated FROM pg_attribute AS a
   WHERE a.attrelid = tbl AND a.attname = vec_col AND a.attnum > 0 AND NOT a.attisdropped;
  IF v_type IS NULL THEN
    -- The model's dimension, under the profile the queue will use.
    IF profile_name IS NULL THEN
      dims := array_length(@extschema@.kv_embed('dimension probe')::real[], 1);
    ELSE
      dims := array_length(@extschema@.kv_embed('dimension probe', 'document', profile_name)::real[], 1);
    END IF;
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', tbl, vec_col,
                   format_type((SELECT p.prorettype FROM pg_proc AS p
                                 WHERE p.oid = '@extschema@.kv_embed(text, text)'::regprocedure), dims));
  ELSIF v_type <> (SELECT p.prorettype FROM pg_proc AS p WHERE p.oid = '@extschema@.kv_embed(text, text)'::regprocedure) THEN
    RAISE EXCEPTION 'kv_vectorize: column % of % is %, not vector', quote_ident(vec_col), tbl, v_type
      USING ERRCODE = '42804';
  ELSIF v_generated <> '' THEN
    RAISE EXCEPTION 'kv_vectorize: column % of % is a generated column', quote_ident(vec_col), tbl
      USING ERRCODE = '42P16', HINT = 'The queue writes the vectors itself: use a plain vector column.';
  END IF;
  EXECUTE format('CREATE TRIGGER kvembed_vectorize BEFORE UPDATE OF %I ON %s FOR EACH ROW '
                 'EXECUTE FUNCTION kvembed.vectorize_trigger(%L, %L, %L, %L)',
                 text_col, tbl, text_col, vec_col, coalesce(profile_name, ''), batch_size);
  -- Fired by logical replication's apply too.
  EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER kvembed_vectorize', tbl);
  FOR part IN SELECT p.relid FROM pg_partition_tree(tbl) AS p WHERE p.relid <> tbl AND p.isleaf LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER kvembed_vectorize', part);
  END LOOP;
  index_name := left(rel.relname, 40) || '_kvembed_pending';
  EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s ((%I IS NULL)) WHERE %I IS NULL AND %I IS NOT NULL',
                 index_name, tbl, vec_col, vec_col, text_col);
  PERFORM kvembed.vectorize_wake();
  EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL', tbl, vec_col, text_col)
    INTO pending;
  RETURN pending;
END
$fn$;
COMMENT ON FUNCTION @extschema@.kv_vectorize(regclass, name, name, text, int) IS
  'Makes a table''s vectors fill in the background: inserts and updates return at once, a worker embeds pending rows in batches';

-- kv_unvectorize(): stops the queue of a table (its vectors stay).
CREATE FUNCTION @extschema@.kv_unvectorize(tbl regclass)
RETURNS boolean
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  cfg record;
  rel record;
BEGIN
  SELECT c.relowner, c.relname, n.nspname INTO rel
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = tbl;
  IF NOT pg_has_role(rel.relowner, 'USAGE') THEN
    RAISE EXCEPTION 'kv_unvectorize: must be the owner of table %', tbl USING ERRCODE = '42501';
  END IF;
  SELECT * INTO cfg FROM kvembed.vectorize_tables() AS v WHERE v.relid = tbl;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  EXECUTE format('DROP TRIGGER kvembed_vectorize ON %s', tbl);
  EXECUTE format('DROP INDEX IF EXISTS %I.%I', rel.nspname, left(rel.relname, 40) || '_kvembed_pending');
  RETURN true;
END
$fn$;
COMMENT ON FUNCTION @extschema@.kv_unvectorize(regclass) IS
  'Stops the background embedding of a table; its vectors stay';
