-- kvembed regression tests: similarity search with pgvector.
-- A corpus of four clearly different topics in a generated column, an HNSW
-- index (vector_cosine_ops) that the planner uses for
-- ORDER BY emb <=> kv_embed(...) LIMIT k, and nearest neighbours that come
-- from the query's topic. The halfvec form (kv_embed_half, halfvec_cosine_ops)
-- and an expression index work the same way.
\set VERBOSITY terse

-- EXPLAIN (COSTS OFF) with the query vector, a constant folded at planning
-- time (kv_embed is IMMUTABLE), shown as '[...]'.
CREATE FUNCTION regress_plan(q text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
  line text;
BEGIN
  FOR line IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP
    RETURN NEXT regexp_replace(line, '''\[[^'']*\]''::(vector|halfvec)', '''[...]''::\1', 'g');
  END LOOP;
END
$$;

CREATE TABLE regress_docs (
  id    serial PRIMARY KEY,
  topic text NOT NULL,
  body  text NOT NULL,
  emb   vector(576) GENERATED ALWAYS AS (kv_embed(body)) STORED
);
INSERT INTO regress_docs (topic, body) VALUES
  ('cooking', 'Simmer the tomato sauce with garlic and basil for twenty minutes.'),
  ('cooking', 'Knead the bread dough until it is smooth, then let it rise for an hour.'),
  ('cooking', 'Boil the pasta in salted water and drain it while it is still al dente.'),
  ('astronomy', 'The telescope revealed the rings of Saturn and several of its moons.'),
  ('astronomy', 'The Milky Way galaxy contains hundreds of billions of stars.'),
  ('astronomy', 'Jupiter is the largest planet in the solar system, a giant made of gas.'),
  ('football', 'The striker scored a stunning goal from outside the penalty area.'),
  ('football', 'The team won the championship after beating their rivals two goals to one.'),
  ('football', 'Fans filled the stadium to watch the cup final between the two clubs.'),
  ('programming', 'The compiler reported a type error on line 42 of the source file.'),
  ('programming', 'Compile the program with optimizations enabled and run the unit tests.'),
  ('programming', 'The function returns a null pointer when the memory allocation fails.');
CREATE INDEX regress_docs_emb_idx ON regress_docs USING hnsw (emb vector_cosine_ops);
ANALYZE regress_docs;

-- The planner uses the index.
SET enable_seqscan = off;
SELECT regress_plan($q$SELECT id FROM regress_docs
                       ORDER BY emb <=> kv_embed('Which team scored more goals in the soccer game?', 'query') LIMIT 3$q$);

-- Each query's three nearest neighbours, through the index, are the three
-- documents of its topic.
CREATE TABLE regress_queries (topic text, query text);
INSERT INTO regress_queries VALUES
  ('cooking', 'recipe for pasta sauce'),
  ('astronomy', 'planets and stars in the galaxy'),
  ('football', 'Which team scored more goals in the soccer game?'),
  ('programming', 'compiler errors in source code');
SELECT q.topic AS query_topic, q.query, n.rank, n.topic
  FROM regress_queries q,
       LATERAL (SELECT row_number() OVER () AS rank, topic
                  FROM (SELECT d.topic FROM regress_docs d
                         ORDER BY d.emb <=> kv_embed(q.query, 'query') LIMIT 3) s) n
 ORDER BY q.topic, n.rank;
-- The same query with a constant, as an application writes it.
SELECT topic FROM regress_docs
 ORDER BY emb <=> kv_embed('compiler errors in source code', 'query') LIMIT 3;
-- Without the index (sequential scan and sort), the same neighbours.
RESET enable_seqscan;
SET enable_indexscan = off;
SELECT regress_plan($q$SELECT id FROM regress_docs
                       ORDER BY emb <=> kv_embed('compiler errors in source code', 'query') LIMIT 3$q$);
SELECT topic FROM regress_docs
 ORDER BY emb <=> kv_embed('compiler errors in source code', 'query') LIMIT 3;
RESET enable_indexscan;
-- Rows inserted after the index was built are found through it.
INSERT INTO regress_docs (topic, body) VALUES
  ('astronomy', 'A comet with a long bright tail passed close to the Sun.');
SET enable_seqscan = off;
SELECT topic, body FROM regress_docs
 ORDER BY emb <=> kv_embed('a comet passing the Sun', 'query') LIMIT 1;
RESET enable_seqscan;

-- halfvec: kv_embed_half with halfvec_cosine_ops (for models wider than
-- 2,000 dimensions), here on the same model.
CREATE TABLE regress_half_docs (
  id   int PRIMARY KEY,
  topic text,
  body text,
  emb  halfvec(576) GENERATED ALWAYS AS (kv_embed_half(body)) STORED
);
INSERT INTO regress_half_docs (id, topic, body) SELECT id, topic, body FROM regress_docs;
CREATE INDEX regress_half_docs_emb_idx ON regress_half_docs USING hnsw (emb halfvec_cosine_ops);
ANALYZE regress_half_docs;
SET enable_seqscan = off;
SELECT regress_plan($q$SELECT id FROM regress_half_docs
                       ORDER BY emb <=> kv_embed_half('planets and stars in the galaxy', 'query') LIMIT 3$q$);
SELECT topic FROM regress_half_docs
 ORDER BY emb <=> kv_embed_half('planets and stars in the galaxy', 'query') LIMIT 3;
RESET enable_seqscan;

-- An expression index on kv_embed(body) of a table without a vector column.
CREATE TABLE regress_expr_docs (id int PRIMARY KEY, topic text, body text);
INSERT INTO regress_expr_docs SELECT id, topic, body FROM regress_docs;
CREATE INDEX regress_expr_docs_idx ON regress_expr_docs
  USING hnsw ((kv_embed(body)::vector(576)) vector_cosine_ops);
ANALYZE regress_expr_docs;
SET enable_seqscan = off;
SELECT regress_plan($q$SELECT id FROM regress_expr_docs
                       ORDER BY kv_embed(body)::vector(576) <=> kv_embed('recipe for pasta sauce', 'query') LIMIT 3$q$);
SELECT topic FROM regress_expr_docs
 ORDER BY kv_embed(body)::vector(576) <=> kv_embed('recipe for pasta sauce', 'query') LIMIT 3;
RESET enable_seqscan;

DROP TABLE regress_docs, regress_queries, regress_half_docs, regress_expr_docs;
DROP FUNCTION regress_plan(text);
