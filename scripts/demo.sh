#!/usr/bin/env bash
# Semantic search in plain SQL: start the local cluster, create the kvembed
# extension in a fresh database `kvembed_demo`, embed ~20 sentences through a
# generated column, index them with HNSW and run three queries.
#
#   bash scripts/demo.sh
#
# The cluster is left running so that you can keep playing:
#   bash scripts/pg.sh psql -d kvembed_demo
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

db=kvembed_demo
bash scripts/pg.sh start
psql=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres)

"${psql[@]}" -d postgres -c "SET client_min_messages = warning" \
  -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
"${psql[@]}" -d "$db" -c "CREATE EXTENSION kvembed CASCADE"   # CASCADE brings in pgvector

# An HNSW index needs a fixed dimension, which depends on the model: ask it.
dims=$("${psql[@]}" -d "$db" -tA -c "SELECT vector_dims(kv_embed('dimension probe'))")
echo "embedding dimension: $dims"

"${psql[@]}" -d "$db" <<SQL
\\timing on
\\echo '== embedding 20 sentences (generated column) and building an HNSW index'
CREATE TABLE sentences (
  id        serial PRIMARY KEY,
  topic     text NOT NULL,
  body      text NOT NULL,
  embedding vector($dims) GENERATED ALWAYS AS (kv_embed(body)) STORED
);

INSERT INTO sentences (topic, body) VALUES
  ('cooking',     'Knead the dough for ten minutes, then let it rise until doubled.'),
  ('cooking',     'A pinch of salt brings out the sweetness of caramel.'),
  ('cooking',     'Sear the steak in a very hot cast-iron pan before roasting it.'),
  ('cooking',     'Fresh basil and garlic are the heart of a good pesto.'),
  ('astronomy',   'Jupiter is the largest planet in our solar system.'),
  ('astronomy',   'The telescope detected an exoplanet orbiting a red dwarf star.'),
  ('astronomy',   'A total solar eclipse happens when the Moon covers the Sun.'),
  ('astronomy',   'Light from the Andromeda galaxy travels for millions of years.'),
  ('programming', 'The function crashed because of a null pointer dereference.'),
  ('programming', 'Write unit tests before refactoring legacy code.'),
  ('programming', 'The compiler reported a type mismatch on line 42.'),
  ('programming', 'Use a hash map to look up values in constant time.'),
  ('sports',      'The striker scored twice in the second half of the match.'),
  ('sports',      'She finished the marathon in under three hours.'),
  ('sports',      'The tennis final went to a fifth-set tiebreak.'),
  ('sports',      'The team trains every morning before the championship.'),
  ('health',      'Drinking enough water helps prevent headaches.'),
  ('health',      'Regular sleep improves memory and concentration.'),
  ('health',      'Vaccines train the immune system to recognise a virus.'),
  ('health',      'A short walk after meals can lower blood sugar.');

CREATE INDEX sentences_embedding_idx ON sentences USING hnsw (embedding vector_cosine_ops);
\\timing off

\\echo
\\echo '== query 1: "how do I bake bread at home?" (expect: cooking)'
SELECT topic, body, round((embedding <=> kv_embed('how do I bake bread at home?', 'query'))::numeric, 4) AS distance
FROM sentences ORDER BY embedding <=> kv_embed('how do I bake bread at home?', 'query') LIMIT 3;

\\echo '== query 2: "planets around other stars" (expect: astronomy)'
SELECT topic, body, round((embedding <=> kv_embed('planets around other stars', 'query'))::numeric, 4) AS distance
FROM sentences ORDER BY embedding <=> kv_embed('planets around other stars', 'query') LIMIT 3;

\\echo '== query 3: "my program has a bug" (expect: programming)'
SELECT topic, body, round((embedding <=> kv_embed('my program has a bug', 'query'))::numeric, 4) AS distance
FROM sentences ORDER BY embedding <=> kv_embed('my program has a bug', 'query') LIMIT 3;

\\echo '== the same kind of query through the HNSW index (sequential scans disabled to show it on 20 rows)'
SET enable_seqscan = off;
EXPLAIN (COSTS OFF)
SELECT body FROM sentences ORDER BY embedding <=> kv_embed('my program has a bug', 'query') LIMIT 3;
SQL

echo
echo "The cluster is still running. Explore:  bash scripts/pg.sh psql -d $db"
echo "Stop it:                                bash scripts/pg.sh stop"
