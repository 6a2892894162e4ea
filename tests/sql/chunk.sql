-- kvembed regression tests: chunking long documents.
-- kv_chunk(text, max_tokens, overlap) with the loaded model's tokenizer;
-- the README's recipe: a chunks table with a generated embedding column,
-- and documents ranked by their best chunk.
\set VERBOSITY terse
\pset null '<NULL>'

-- Paragraphs are kept whole when they fit; positions are characters from 1,
-- as substr counts them.
SELECT ord, chunk, start_char, end_char, tokens <= 24 AS fits
  FROM kv_chunk(E'The first paragraph talks about cats. Cats sleep a lot.\n\n'
                'The second paragraph is about the sea. Waves come and go all day long.\n\n'
                'A third, short one.', 24, 0);
SELECT bool_and(substr(t, start_char, end_char - start_char + 1) = chunk) AS positions_agree,
       count(*) > 1 AS several
  FROM (SELECT repeat('Ünïcödé wörds, 日本語の文章。 Ready? ', 40) AS t) AS x,
       kv_chunk(t, 32, 8);
-- Defaults (256 tokens, 32 overlap); empty and NULL texts give no rows.
SELECT count(*) AS one_chunk FROM kv_chunk('A short text.');
SELECT count(*) AS no_chunks FROM kv_chunk('');
SELECT count(*) AS no_chunks FROM kv_chunk(NULL);

-- The recipe: documents, their chunks with a generated vector, and a query
-- that ranks documents by their best chunk.
CREATE TABLE regress_docs (id int PRIMARY KEY, body text NOT NULL);
INSERT INTO regress_docs VALUES
  (1, repeat('Cooking pasta needs salted boiling water. ', 30) ||
      E'\n\nThe sauce is tomatoes, garlic and olive oil, simmered slowly.'),
  (2, repeat('The train left the station at noon. ', 30) ||
      E'\n\nPassengers read newspapers while the countryside passed by.'),
  (3, 'Volcanoes erupt when magma rises through the crust.');
CREATE TABLE regress_chunks (
  doc_id int REFERENCES regress_docs ON DELETE CASCADE,
  ord    int,
  chunk  text NOT NULL,
  emb    vector(576) GENERATED ALWAYS AS (kv_embed(chunk)) STORED,
  PRIMARY KEY (doc_id, ord)
);
INSERT INTO regress_chunks (doc_id, ord, chunk)
  SELECT d.id, c.ord, c.chunk FROM regress_docs AS d, kv_chunk(d.body, 64, 8) AS c;
SELECT doc_id, count(*) AS chunks, bool_and(vector_dims(emb) = 576) AS embedded
  FROM regress_chunks GROUP BY doc_id ORDER BY doc_id;
CREATE INDEX ON regress_chunks USING hnsw (emb vector_cosine_ops);
WITH nearest AS (
  SELECT doc_id, emb <=> kv_embed('how do I make a tomato sauce', 'query') AS distance
  FROM regress_chunks
  ORDER BY distance LIMIT 100)
SELECT doc_id
FROM nearest GROUP BY doc_id ORDER BY min(distance) LIMIT 1;
SELECT c.ord, c.tokens <= 256 AS fits
  FROM regress_docs AS a, kv_chunk(a.body, max_tokens => 256, overlap => 32) AS c WHERE a.id = 1;

-- Bad arguments are clear errors.
SELECT * FROM kv_chunk('x', 4);
SELECT * FROM kv_chunk('x', 64, 40);
SELECT * FROM kv_chunk('x', -1, 0);

DROP TABLE regress_chunks, regress_docs;
