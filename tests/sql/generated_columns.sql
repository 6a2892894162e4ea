-- kvembed regression tests: storing embeddings.
-- Generated columns (GENERATED ALWAYS AS (kv_embed(body)) STORED) filled on
-- INSERT, UPDATE and COPY; NULL and empty texts; dimension checks; the
-- IMMUTABLE caveat (stored vectors follow the settings in force when they
-- were computed); kv_backfill for plain columns.
\set VERBOSITY terse
\pset null '<NULL>'

CREATE TABLE regress_gen (
  id   int PRIMARY KEY,
  body text,
  emb  vector(576) GENERATED ALWAYS AS (kv_embed(body)) STORED
);
INSERT INTO regress_gen (id, body) VALUES (1, 'first row'), (2, NULL), (3, '');
COPY regress_gen (id, body) FROM stdin;
4	copied row
5	\N
6	another copied row
\.
-- A NULL text gives a NULL vector; every other row holds kv_embed(body).
SELECT id, body, emb IS NULL AS emb_null, vector_dims(emb) AS dims,
       (emb <=> kv_embed(body)) < 1e-5 AS emb_fresh
  FROM regress_gen ORDER BY id;
-- Query embeddings and halfvec columns work the same way.
CREATE TABLE regress_gen_more (
  body text,
  qemb vector(576) GENERATED ALWAYS AS (kv_embed(body, 'query')) STORED,
  half halfvec(576) GENERATED ALWAYS AS (kv_embed_half(body)) STORED
);
INSERT INTO regress_gen_more VALUES ('a query text'), (NULL);
SELECT body, vector_dims(qemb) AS qdims, vector_dims(half) AS hdims,
       (qemb <=> kv_embed(body, 'query')) < 1e-5 AS qemb_fresh,
       (half::vector <=> kv_embed(body)) < 1e-5 AS half_fresh
  FROM regress_gen_more ORDER BY body;

-- UPDATE of the text recomputes the vectors.
CREATE TABLE regress_before AS SELECT id, emb FROM regress_gen;
UPDATE regress_gen SET body = 'first row, edited' WHERE id = 1;
UPDATE regress_gen SET body = 'was null' WHERE id = 2;
UPDATE regress_gen SET body = NULL WHERE id = 4;
SELECT g.id, g.body, g.emb IS NULL AS emb_null,
       (g.emb <=> kv_embed(g.body)) < 1e-5 AS emb_fresh,
       (g.emb <=> b.emb) > 1e-3 AS changed
  FROM regress_gen g JOIN regress_before b USING (id) ORDER BY g.id;
-- INSERT ... SELECT and UPSERT.
INSERT INTO regress_gen (id, body) SELECT 10 + i, 'generated row ' || i FROM generate_series(1, 3) AS i;
INSERT INTO regress_gen (id, body) VALUES (11, 'replaced by an upsert')
  ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body;
SELECT id, body, (emb <=> kv_embed(body)) < 1e-5 AS emb_fresh FROM regress_gen WHERE id > 10 ORDER BY id;
SELECT count(*) AS rows, count(emb) AS vectors FROM regress_gen;

-- A generated column cannot be written directly.
INSERT INTO regress_gen (id, body, emb) VALUES (20, 'x', NULL);
UPDATE regress_gen SET emb = NULL WHERE id = 1;
-- The column's dimension must be the model's.
CREATE TABLE regress_gen_dim (body text, emb vector(3) GENERATED ALWAYS AS (kv_embed(body)) STORED);
INSERT INTO regress_gen_dim (body) VALUES ('three dimensions are too few');
INSERT INTO regress_gen_dim (body) VALUES (NULL);
SELECT count(*) AS rows FROM regress_gen_dim;
-- Only IMMUTABLE expressions may generate a column, and kv_embed is one.
CREATE TABLE regress_gen_volatile (body text, emb vector GENERATED ALWAYS AS (kv_embed(body || random()::text)) STORED);

-- The IMMUTABLE caveat: stored vectors keep the settings they were made
-- with. After a change, they differ from a fresh kv_embed until the rows are
-- re-embedded (UPDATE t SET body = body).
SET kvembed.layers = '6-8';
SELECT id, (emb <=> kv_embed(body)) < 1e-5 AS emb_fresh FROM regress_gen WHERE id IN (1, 3) ORDER BY id;
UPDATE regress_gen SET body = body WHERE id = 1;
SELECT id, (emb <=> kv_embed(body)) < 1e-5 AS emb_fresh FROM regress_gen WHERE id IN (1, 3) ORDER BY id;
RESET kvembed.layers;
UPDATE regress_gen SET body = body WHERE id = 1;
SELECT id, (emb <=> kv_embed(body)) < 1e-5 AS emb_fresh FROM regress_gen WHERE id IN (1, 3) ORDER BY id;

-- kv_backfill fills the NULL vectors of a plain column in committed
-- batches, skipping NULL texts and vectors already there. Its progress
-- NOTICEs carry timings, so they are left out.
CREATE TABLE regress_backfill (id int PRIMARY KEY, body text, emb vector, half halfvec(576));
INSERT INTO regress_backfill (id, body) SELECT i, 'document number ' || i FROM generate_series(1, 6) AS i;
INSERT INTO regress_backfill (id, body) VALUES (100, NULL);
UPDATE regress_backfill SET emb = kv_embed('not this text') WHERE id = 6;
SET client_min_messages = warning;
CALL kv_backfill('regress_backfill', 'body', 'emb', 4);
CALL kv_backfill('regress_backfill', 'body', 'half');
RESET client_min_messages;
SELECT count(*) AS rows, count(emb) AS vectors, count(half) AS halfvecs,
       count(*) FILTER (WHERE (emb <=> kv_embed(body)) < 1e-5) AS fresh,
       count(*) FILTER (WHERE (half::vector <=> kv_embed(body)) < 1e-5) AS fresh_half,
       bool_and((emb <=> kv_embed('not this text')) < 1e-5) FILTER (WHERE id = 6) AS kept_existing
  FROM regress_backfill;
-- Nothing left to do.
SET client_min_messages = warning;
CALL kv_backfill('regress_backfill', 'body', 'emb', 4);
RESET client_min_messages;
SELECT count(*) FILTER (WHERE emb IS NULL AND body IS NOT NULL) AS left_to_embed FROM regress_backfill;
-- Errors: batch size, inside a transaction block (it COMMITs), a column of
-- the wrong dimension.
CALL kv_backfill('regress_backfill', 'body', 'emb', 0);
UPDATE regress_backfill SET emb = NULL WHERE id = 1;
BEGIN;
CALL kv_backfill('regress_backfill', 'body', 'emb');
ROLLBACK;
CREATE TABLE regress_backfill_dim (body text, emb vector(3));
INSERT INTO regress_backfill_dim VALUES ('x');
CALL kv_backfill('regress_backfill_dim', 'body', 'emb');
-- Partitions: every row gets its own vector (rows are told apart by
-- tableoid and ctid, and ctids repeat across partitions).
CREATE TABLE regress_backfill_part (lang text NOT NULL, body text, emb vector) PARTITION BY LIST (lang);
CREATE TABLE regress_backfill_part_en PARTITION OF regress_backfill_part FOR VALUES IN ('en');
CREATE TABLE regress_backfill_part_de PARTITION OF regress_backfill_part FOR VALUES IN ('de');
INSERT INTO regress_backfill_part (lang, body) VALUES
  ('en', 'The cat sat on the mat.'), ('en', 'Stock markets fell sharply.'),
  ('de', 'Zwei Hunde spielen im Schnee.'), ('de', 'Der Zug hat Verspätung.');
SELECT count(*) AS rows, count(DISTINCT ctid) AS distinct_ctids FROM regress_backfill_part;
SET client_min_messages = warning;
CALL kv_backfill('regress_backfill_part', 'body', 'emb', 4);
RESET client_min_messages;
SELECT tableoid::regclass::text AS partition, body, (emb <=> kv_embed(body)) < 1e-5 AS own_vector
  FROM regress_backfill_part ORDER BY 1, 2;

DROP TABLE regress_gen, regress_gen_more, regress_before, regress_gen_dim, regress_backfill, regress_backfill_dim,
  regress_backfill_part;
