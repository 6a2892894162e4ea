-- kvembed regression tests: the engine's metrics.
-- kvembed.stats per database and role (requests, texts, tokens, errors by
-- SQLSTATE, queue wait and inference time, batch fill), kv_stats_reset(),
-- and the postgres_exporter query of the README.
\set VERBOSITY terse
\pset null '<NULL>'

SELECT kv_stats_reset() >= 0 AS reset;
SELECT count(*) AS rows_after_reset FROM kvembed.stats;
-- Three requests that embed (one text, three texts, one text), one refused
-- (54000: too long with on_overflow = 'error'), one chunking.
SELECT vector_dims(kv_embed('metrics, first text')) AS dims;
SELECT cardinality(kv_embed_batch(ARRAY['a', 'b', 'c'])) AS n;
SELECT vector_dims(kv_embed('metrics', 'query')) AS dims;
SET kvembed.max_tokens = 8;
SET kvembed.on_overflow = 'error';
SELECT kv_embed(repeat('too long for eight tokens ', 10));
RESET kvembed.max_tokens;
RESET kvembed.on_overflow;
SELECT count(*) AS chunks FROM kv_chunk('One sentence. Another sentence.');
SELECT role = current_user AS mine, requests, texts, tokens > texts AS tokens_counted, errors,
       queue_wait_p50_ms >= 0 AND queue_wait_p50_ms <= queue_wait_p99_ms AS queue_quantiles,
       inference_p50_ms > 0 AND inference_p50_ms <= inference_p99_ms AS inference_quantiles,
       batch_fill > 0 AND batch_fill <= 1 AS fill,
       since <= now() AS since
  FROM kvembed.stats WHERE database = current_database();

-- The README's query for postgres_exporter (one row per database and role).
SELECT database = current_database() AS db, requests, texts,
       coalesce((SELECT sum(value::bigint) FROM jsonb_each_text(errors)), 0) AS errors,
       inference_p99_ms / 1000 > 0 AS inference_p99_seconds
  FROM kvembed.stats;

-- Any role reads the view; resetting is for superusers and kvembed_admin.
CREATE ROLE regress_metrics_reader;
SET ROLE regress_metrics_reader;
SELECT count(*) > 0 AS readable FROM kvembed.stats;
SELECT kv_stats_reset();
RESET ROLE;
DROP ROLE regress_metrics_reader;
SELECT kv_stats_reset() = 1 AS one_row_reset;
