-- kvembed regression tests: the embedding functions.
-- kv_embed, kv_embed_half and kv_embed_batch: result types, dimensions,
-- normalisation, roles, NULL handling, empty and unusual texts, batches, and
-- kv_status(). Vectors are never printed: only their dimensions and
-- comparisons with a tolerance (cosine distance <=>), which hold on any CPU.
\set VERBOSITY terse
\pset null '<NULL>'

-- Result types and dimensions (the model's hidden size).
SELECT pg_typeof(kv_embed('x')) AS kv_embed,
       pg_typeof(kv_embed_half('x')) AS kv_embed_half,
       pg_typeof(kv_embed_batch(ARRAY['x'])) AS kv_embed_batch;
SELECT vector_dims(kv_embed('The cat sat on the mat.')) AS document,
       vector_dims(kv_embed('The cat sat on the mat.', 'query')) AS query,
       vector_dims(kv_embed_half('The cat sat on the mat.')) AS half;
SELECT vector_dims(kv_embed('x')) = dim AS dim_matches_kv_status FROM kv_status();

-- Vectors are L2-normalised (halfvec: within its rounding).
SELECT abs(vector_norm(kv_embed('The cat sat on the mat.')) - 1) < 1e-4 AS unit_document,
       abs(vector_norm(kv_embed('The cat sat on the mat.', 'query')) - 1) < 1e-4 AS unit_query,
       abs(l2_norm(kv_embed_half('The cat sat on the mat.')) - 1) < 1e-3 AS unit_half;

-- The same text gives the same vector; other texts give other vectors.
SELECT (kv_embed('The cat sat on the mat.') <=> kv_embed('The cat sat on the mat.')) < 1e-5 AS same_text_same_vector,
       (kv_embed('The cat sat on the mat.') <=> kv_embed('Stock markets fell sharply.')) > 1e-2 AS other_text_other_vector;

-- Roles: 'document' (default; also 'doc', 'passage') and 'query' ('q'),
-- case-insensitive, surrounding blanks ignored. A query embeds with the
-- query prompt, so it differs from the document embedding of the same text.
SELECT (kv_embed('hello world') <=> kv_embed('hello world', 'document')) < 1e-5 AS default_is_document,
       (kv_embed('hello world') <=> kv_embed('hello world', 'doc')) < 1e-5 AS doc,
       (kv_embed('hello world') <=> kv_embed('hello world', 'passage')) < 1e-5 AS passage,
       (kv_embed('hello world') <=> kv_embed('hello world', ' DOCUMENT ')) < 1e-5 AS document_upper;
SELECT (kv_embed('hello world', 'query') <=> kv_embed('hello world', 'q')) < 1e-5 AS q,
       (kv_embed('hello world', 'query') <=> kv_embed('hello world', 'Query')) < 1e-5 AS query_mixed_case,
       (kv_embed('The cat sat on the mat.', 'query') <=> kv_embed('The cat sat on the mat.')) > 1e-3 AS query_differs_from_document;
SELECT kv_embed('hello world', 'banana');
SELECT kv_embed('hello world', '');
SELECT kv_embed_half('hello world', 'banana');
SELECT kv_embed_batch(ARRAY['hello world'], 'banana');

-- STRICT: a NULL text or role gives NULL, without asking the engine.
SELECT kv_embed(NULL) IS NULL AS null_text,
       kv_embed('x', NULL) IS NULL AS null_role,
       kv_embed_half(NULL) IS NULL AS half_null_text,
       kv_embed_batch(NULL::text[]) IS NULL AS batch_null_array,
       kv_embed_batch(ARRAY['x'], NULL) IS NULL AS batch_null_role;

-- Empty, blank and unusual texts still embed to unit vectors.
SELECT label, vector_dims(v) AS dims, abs(vector_norm(v) - 1) < 1e-4 AS unit
  FROM (VALUES ('empty', kv_embed('')),
               ('space', kv_embed(' ')),
               ('whitespace', kv_embed(E'\n\t  ')),
               ('unicode', kv_embed('Ünïcödé, emoji 😀 and עברית')),
               ('sql', kv_embed('SELECT * FROM t;')),
               ('empty query', kv_embed('', 'query'))) AS t(label, v);

-- kv_embed_batch: one element per input, in order; NULL elements give NULL.
SELECT kv_embed_batch('{}'::text[]) AS empty_array,
       kv_embed_batch(ARRAY[NULL, NULL]::text[]) AS all_null;
SELECT cardinality(b) AS n,
       b[1] IS NOT NULL AS first, b[2] IS NULL AS second_null, b[3] IS NOT NULL AS third_empty_text,
       vector_dims(b[1]) AS dims, vector_dims(b[3]) AS dims_empty
  FROM (SELECT kv_embed_batch(ARRAY['first text', NULL, '']) AS b) s;
-- The batch gives the vectors kv_embed gives, for both roles.
SELECT (b[1] <=> kv_embed('The cat sat on the mat.')) < 1e-5 AS first,
       (b[2] <=> kv_embed('Stock markets fell sharply.')) < 1e-5 AS second,
       (b[3] <=> kv_embed('')) < 1e-5 AS third
  FROM (SELECT kv_embed_batch(ARRAY['The cat sat on the mat.', 'Stock markets fell sharply.', '']) AS b) s;
SELECT (b[2] <=> kv_embed('hello world', 'query')) < 1e-5 AS query_role
  FROM (SELECT kv_embed_batch(ARRAY[NULL, 'hello world'], 'query') AS b) s;
-- More than 256 texts travel in several requests and come back in order.
SELECT cardinality(b) AS n,
       (b[1] <=> kv_embed('1')) < 1e-5 AS first,
       (b[256] <=> kv_embed('256')) < 1e-5 AS last_of_first_request,
       (b[257] <=> kv_embed('257')) < 1e-5 AS first_of_second_request,
       (b[258] <=> kv_embed('258')) < 1e-5 AS last
  FROM (SELECT kv_embed_batch(array_agg(i::text ORDER BY i)) AS b FROM generate_series(1, 258) AS i) s;
-- A multi-dimensional array is taken element by element (row-major) and
-- gives a one-dimensional array starting at 1.
SELECT array_ndims(b) AS ndims, array_lower(b, 1) AS lower, cardinality(b) AS n, b[4] IS NULL AS fourth_null,
       (b[3] <=> kv_embed('c')) < 1e-5 AS third_is_c
  FROM (SELECT kv_embed_batch(ARRAY[['a', 'b'], ['c', NULL]]) AS b) s;

-- kv_embed_half is kv_embed rounded to half precision.
SELECT (kv_embed_half('hello world')::vector <=> kv_embed('hello world')) < 1e-5 AS half_is_rounded_vector,
       (kv_embed_half('hello world', 'query')::vector <=> kv_embed('hello world', 'query')) < 1e-5 AS half_query;

-- Non-constant arguments: one call per row.
SELECT body, vector_dims(kv_embed(body, role)) AS dims
  FROM (VALUES ('a row', 'document'), ('another row', 'query'), (NULL, 'query')) AS t(body, role)
 ORDER BY body;

-- kv_status(): the engine's state and this session's effective settings
-- (machine-dependent columns left out).
SELECT state, architecture, dim, n_layers, method, layers, layers_source, bias,
       max_tokens, on_overflow, document_prompt, query_prompt
  FROM kv_status();
SELECT engine_pid > 0 AS engine_pid, supervisor_pid > 0 AS supervisor_pid,
       requests_served > 0 AS requests_served, texts_served >= requests_served AS texts_served,
       tokens_served > 0 AS tokens_served, queue_depth >= 0 AS queue_depth, threads > 0 AS threads,
       batch_tokens, model_id LIKE 'llama:%' AS model_id
  FROM kv_status();
-- kvembed.status_json(), what kv_status() is made of, has a few more keys.
SELECT k AS status_json_key FROM jsonb_object_keys(kvembed.status_json()) AS k ORDER BY k;
SELECT jsonb_typeof(kvembed.status_json()->'cpu') AS cpu,
       (kvembed.status_json()->>'max_tokens_limit')::int AS max_tokens_limit,
       (kvembed.status_json()->>'max_calibration_texts')::int AS max_calibration_texts;
