#!/usr/bin/env bash
# The asynchronous embedding queue (kv_vectorize) against kv_embed_batch,
# measured side by side on the running local cluster, on the same texts:
#
#   bash scripts/bench_queue.sh [--rows N] [--batch-size B] [--repeat R] [--out FILE]
#
#   --rows N        texts (default 20000): deterministic sentences of 15-60 tokens
#   --batch-size B  the queue's batch size (kv_vectorize's default: 256); a list
#                   (256,64) measures the queue once per size
#   --repeat R      timed runs of each path (default 1); medians are reported
#   --out FILE      the report (default docs/BENCHMARKS-queue.md)
#
# Paths, each from an empty table:
#   1. kv_embed_batch over every text, 256 per call (embedding only, nothing
#      written): the peer.
#   2. INSERT of every row into a plain table (no vector), 100 rows per
#      transaction: plain-table speed.
#   3. the same INSERTs into a vectorized table while its queue worker drains
#      concurrently; timed from the first INSERT until nothing is pending
#      (end to end), and the INSERTs alone.
# Every vector the queue wrote is checked against kv_embed_batch's. Needs the
# cluster running with kvembed installed (scripts/pg.sh start). Nothing here
# is a test: figures are reported, never asserted.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

rows=20000 batch=256 repeat=1 out="$KVEMBED_ROOT/docs/BENCHMARKS-queue.md"
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows=$2; shift ;;
    --batch-size) batch=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "bench_queue.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
DB=kvembed_bench_queue
say() { echo "[bench-queue] $*" >&2; }
q() { "$PG_BINDIR/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres -d "$DB" "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {print b - a}'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

bash scripts/pg.sh start >/dev/null
"$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres \
  -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
q -c "SET client_min_messages = warning" -c "CREATE EXTENSION kvembed CASCADE"
say "texts: $rows"
q <<SQL
CREATE TABLE src (id bigint PRIMARY KEY, body text NOT NULL);
INSERT INTO src
SELECT i, (SELECT string_agg(
             initcap((ARRAY['the database','a query planner','the new index','our search service','a vector column',
                            'the backup job','the replication slot','a background worker','the storage engine',
                            'an old laptop','the city council','a young chef','the river','the football team',
                            'a small bakery','the museum'])[1 + abs(hashint4(i * 7 + k)) % 16]) || ' ' ||
             (ARRAY['stores','returns','ignores','rebuilds','compresses','describes','scans','sorts',
                    'reports','loses','delivers','repairs'])[1 + abs(hashint4(i * 11 + k)) % 12] || ' ' ||
             (ARRAY['millions of rows','the nearest neighbours','a long list of documents','every sentence',
                    'fresh bread before dawn','the final score','old paintings','slow queries',
                    'the embeddings','a cold winter'])[1 + abs(hashint4(i * 13 + k)) % 10] || ' ' ||
             (ARRAY['after the upgrade','without any downtime','every night at midnight','in under a second',
                    'because the disk was full','while the users sleep','despite the heavy rain',
                    'on a single core'])[1 + abs(hashint4(i * 17 + k)) % 8] || '.', ' ')
            FROM generate_series(1, 1 + abs(hashint4(i)) % 3) AS k) || ' (note ' || i || ')'
  FROM generate_series(1, $rows) AS i;
SQL
q -c "SELECT vector_dims(kv_embed('warm up'))" >/dev/null
model=$(q -c "SELECT model_id FROM kv_status()")
model=${model//$KVEMBED_ROOT\//}
threads=$(q -c "SELECT threads FROM kv_status()")
tokens=$(q -c "SHOW kvembed.batch_tokens")
say "model $model, $threads threads"

# Inserts the texts into $1, 100 rows per transaction, in one session.
insert_all() {
  local table=$1
  { for ((a = 1; a <= rows; a += 100)); do
      echo "INSERT INTO $table (id, body) SELECT id, body FROM src WHERE id BETWEEN $a AND $((a + 99));"
    done; } | q
}

IFS=, read -ra sizes <<< "$batch"
batch_s=() plain_s=()
declare -A queue_s queue_insert_s view_rate
for ((r = 1; r <= repeat; r++)); do
  t0=$(now)
  q -c "SELECT sum(cardinality(v)) FROM (SELECT kv_embed_batch(array_agg(body ORDER BY id)) AS v FROM src GROUP BY (id - 1) / 256) s" >/dev/null
  batch_s+=("$(elapsed "$t0")")
  say "run $r: kv_embed_batch ${batch_s[-1]} s"

  q -c "DROP TABLE IF EXISTS plain" -c "CREATE TABLE plain (id bigint PRIMARY KEY, body text NOT NULL)"
  t0=$(now); insert_all plain; plain_s+=("$(elapsed "$t0")")
  say "run $r: plain INSERTs ${plain_s[-1]} s"

  for b in "${sizes[@]}"; do
    q -c "SELECT kv_unvectorize(oid) FROM pg_class WHERE relname = 'queued' AND relnamespace = 'public'::regnamespace" >/dev/null
    q -c "DROP TABLE IF EXISTS queued" -c "CREATE TABLE queued (id bigint PRIMARY KEY, body text NOT NULL)"
    q -c "SELECT kv_vectorize('queued', 'body', 'emb', batch_size => $b)" >/dev/null
    t0=$(now); insert_all queued; t1=$(now)
    queue_insert_s[$b]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}') "
    while [ "$(q -c "SELECT pending FROM kvembed.vectorized WHERE table_name = 'queued'::regclass")" != 0 ]; do
      sleep 0.2
    done
    queue_s[$b]+="$(elapsed "$t0") "
    view_rate[$b]+="$(q -c "SELECT rows_per_second FROM kvembed.vectorized WHERE table_name = 'queued'::regclass") "
    say "run $r: queue, batch_size $b: INSERTs done after $(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}') s, drained after $(elapsed "$t0") s"
  done
done

# Every vector the queue wrote equals kv_embed_batch's for its text.
check_sql="SELECT count(*) FILTER (WHERE e.emb IS NOT NULL AND e.emb <=> b.v < 1e-5) || '/' || count(*)
  FROM (SELECT unnest(array_agg(id ORDER BY id)) AS id, unnest(kv_embed_batch(array_agg(body ORDER BY id))) AS v
          FROM queued GROUP BY (id - 1) / 256) AS b
  JOIN queued AS e USING (id)"
check=$(q -c "$check_sql")
say "vectors equal to kv_embed_batch's: $check"

m_batch=$(printf '%s\n' "${batch_s[@]}" | median)
m_plain=$(printf '%s\n' "${plain_s[@]}" | median)
rate() { awk -v n="$rows" -v s="$1" 'BEGIN {printf "%.1f", n / s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
queue_rows="" insert_rows="" rates=""
for b in "${sizes[@]}"; do
  m=$(printf '%s\n' ${queue_s[$b]} | median)
  queue_rows+="| queue end to end: INSERTs (100 rows per transaction) with the worker draining (batch_size $b), until nothing is pending | $(printf '%.1f' "$m") | $(rate "$m") | $(ratio "$m_batch" "$m") |"$'\n'
  m=$(printf '%s\n' ${queue_insert_s[$b]} | median)
  insert_rows+="| vectorized table (batch_size $b), while the worker drains | $(printf '%.2f' "$m") | $(rate "$m") | $(ratio "$m_plain" "$m") |"$'\n'
  rates+="batch_size $b: ${view_rate[$b]}rows/s; "
done
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mkdir -p "$(dirname "$out")"
cat > "$out" <<EOF
# The asynchronous queue

<!-- Generated by scripts/bench_queue.sh; edits are overwritten. -->

\`\`\`sh
bash scripts/bench_queue.sh ${args[*]}
\`\`\`

Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $cpu ($(nproc) cores), PostgreSQL $(q -c "SHOW server_version"),
model \`$model\`, engine threads $threads, batch_tokens $tokens. $rows deterministic sentences (15-60 tokens);
each figure is the median of $repeat run(s), every path from an empty table, one after the other.

| path | seconds | rows/s | against kv_embed_batch |
| --- | --- | --- | --- |
| \`kv_embed_batch\`, 256 texts per call (embedding only, nothing written) | $(printf '%.1f' "$m_batch") | $(rate "$m_batch") | 1.00 |
$queue_rows

| INSERTs, 100 rows per transaction | seconds | rows/s | against a plain table |
| --- | --- | --- | --- |
| plain table | $(printf '%.2f' "$m_plain") | $(rate "$m_plain") | 1.00 |
$insert_rows

The worker's own rate while draining (\`kvembed.vectorized.rows_per_second\`, per run): $rates
Vectors the queue wrote in the last run (batch_size ${sizes[-1]}) that equal \`kv_embed_batch\`'s for the same text (cosine distance < 1e-5): $check.

A row being embedded is locked (\`FOR UPDATE SKIP LOCKED\`) until its batch commits: an UPDATE of it waits
up to one batch, about batch_size / rows per second.
EOF
say "wrote $out"
