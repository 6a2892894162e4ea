-- kvembed regression tests: the asynchronous embedding queue.
-- kv_vectorize() makes a table's vectors fill in the background: INSERT and
-- COPY return at once, the queue worker embeds the pending rows, an UPDATE
-- of the text (and only of the text) makes a row pending again, partitioned
-- tables work, kvembed.vectorized shows the queue, kv_unvectorize() stops it.
\set VERBOSITY terse
\pset null '<NULL>'
CREATE FUNCTION regress_sqlstate(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE;
END
$$;
-- Waits (up to two minutes) until the queue of tbl is empty; true if it
-- emptied. Each statement of the loop sees the worker's latest commits.
CREATE FUNCTION regress_drained(tbl regclass) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..1200 LOOP
    IF (SELECT pending FROM kvembed.vectorized WHERE table_name = tbl) = 0 THEN
      RETURN true;
    END IF;
    PERFORM pg_sleep(0.1);
  END LOOP;
  RETURN false;
END
$$;

-- (roles are cluster-wide: an interrupted run may have left them)
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_queue_owner;
DROP ROLE IF EXISTS regress_queue_stranger;
RESET client_min_messages;
SET kvembed.layers = 'default';
SELECT kv_create_profile('regress_queue') IS NOT NULL AS profile;
RESET kvembed.layers;

CREATE TABLE docs (id int PRIMARY KEY, body text, tag text);
INSERT INTO docs SELECT i, 'queued document number ' || i, 'a' FROM generate_series(1, 40) AS i;
INSERT INTO docs VALUES (41, NULL, 'no text');
-- The vector column is created with the model's dimension; every row with a
-- text is pending.
SELECT kv_vectorize('docs', 'body', 'emb', profile => 'regress_queue', batch_size => 8) AS pending;
SELECT format_type(atttypid, atttypmod) = format_type(atttypid, vector_dims(kv_embed('x'))) AS typed
  FROM pg_attribute WHERE attrelid = 'docs'::regclass AND attname = 'emb';
SELECT table_name, text_col, vec_col, profile, batch_size FROM kvembed.vectorized;
SELECT regress_drained('docs') AS drained;
SELECT count(*) FILTER (WHERE emb IS NOT NULL) AS embedded,
       count(*) FILTER (WHERE emb IS NULL) AS without_text,
       count(*) FILTER (WHERE emb <=> kv_embed(body, 'document', 'regress_queue') < 1e-5) AS same_as_kv_embed
  FROM docs;
SELECT pending, oldest_pending_age, embedded, rows_per_second > 0 AS rate, failed_rows, last_error
  FROM kvembed.vectorized WHERE table_name = 'docs'::regclass;

-- Only a change of the text makes a row pending again.
UPDATE docs SET tag = 'b' WHERE id = 1;
UPDATE docs SET body = body WHERE id = 2;
UPDATE docs SET body = 'a revised text' WHERE id = 3;
SELECT id, emb IS NULL AS pending FROM docs WHERE id <= 3 ORDER BY id;
-- A statement that sets the text and the vector keeps its vector.
UPDATE docs SET body = 'given', emb = kv_embed('given', 'document', 'regress_queue') WHERE id = 4;
SELECT emb IS NULL AS pending FROM docs WHERE id = 4;
-- INSERT ... ON CONFLICT DO UPDATE of the text, and COPY.
INSERT INTO docs (id, body) VALUES (5, 'upserted text') ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body;
COPY docs (id, body) FROM STDIN;
101	copied row one
102	copied row two
\.
SELECT regress_drained('docs') AS drained;
SELECT id, emb <=> kv_embed(body, 'document', 'regress_queue') < 1e-5 AS current
  FROM docs WHERE id IN (1, 2, 3, 4, 5, 101, 102) ORDER BY id;

-- A partitioned table: partitions share the parent's queue, including one
-- attached later.
CREATE TABLE notes (id int, region text, body text) PARTITION BY LIST (region);
CREATE TABLE notes_eu PARTITION OF notes FOR VALUES IN ('eu');
CREATE TABLE notes_us PARTITION OF notes FOR VALUES IN ('us');
INSERT INTO notes SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, 'note ' || i FROM generate_series(1, 6) AS i;
SELECT kv_vectorize('notes', 'body', 'emb', profile => 'regress_queue') AS pending;
CREATE TABLE notes_ap PARTITION OF notes FOR VALUES IN ('ap');
INSERT INTO notes VALUES (7, 'ap', 'note 7');
SELECT regress_drained('notes') AS drained;
SELECT tableoid::regclass AS part, count(*) AS rows,
       count(*) FILTER (WHERE emb <=> kv_embed(body, 'document', 'regress_queue') < 1e-5) AS current
  FROM notes GROUP BY 1 ORDER BY 1;
UPDATE notes SET body = 'note seven, revised' WHERE id = 7;
SELECT emb IS NULL AS pending FROM notes WHERE id = 7;
SELECT regress_drained('notes') AS drained;
-- Only the parent is listed.
SELECT table_name FROM kvembed.vectorized ORDER BY 1;

-- The worker embeds as the table's owner, and code on the table cannot
-- take the worker's superuser identity back.
CREATE ROLE regress_queue_owner;
GRANT CREATE ON SCHEMA public TO regress_queue_owner;
SET ROLE regress_queue_owner;
CREATE TABLE owned (id int, body text);
CREATE TABLE owned_log (what text, who name);
CREATE FUNCTION owned_escape() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  BEGIN
    EXECUTE 'RESET ROLE';
    INSERT INTO public.owned_log VALUES ('escaped to ' || current_user, current_user);
  EXCEPTION WHEN OTHERS THEN
    INSERT INTO public.owned_log VALUES (SQLERRM, current_user);
  END;
  RETURN NEW;
END
$$;
CREATE TRIGGER owned_escape BEFORE UPDATE ON owned FOR EACH ROW EXECUTE FUNCTION owned_escape();
INSERT INTO owned VALUES (1, 'an owned text');
SELECT kv_vectorize('owned', 'body', 'emb', profile => 'regress_queue') AS pending;
RESET ROLE;
SELECT regress_drained('owned') AS drained;
SELECT what, who FROM owned_log;
SELECT kv_unvectorize('owned') AS removed;
DROP TABLE owned, owned_log;
DROP FUNCTION owned_escape();
REVOKE CREATE ON SCHEMA public FROM regress_queue_owner;
DROP ROLE regress_queue_owner;

-- Errors.
SELECT regress_sqlstate($$SELECT kv_vectorize('docs', 'body', 'emb')$$) AS twice;
CREATE TABLE other (id int, body text, emb vector(3), gen vector GENERATED ALWAYS AS (kv_embed(body)) STORED, n int);
CREATE VIEW other_view AS SELECT * FROM other;
SELECT regress_sqlstate($$SELECT kv_vectorize('other_view', 'body', 'e')$$) AS view,
       regress_sqlstate($$SELECT kv_vectorize('other', 'nope', 'e')$$) AS no_column,
       regress_sqlstate($$SELECT kv_vectorize('other', 'n', 'e')$$) AS not_text,
       regress_sqlstate($$SELECT kv_vectorize('other', 'body', 'n')$$) AS not_vector,
       regress_sqlstate($$SELECT kv_vectorize('other', 'body', 'gen')$$) AS generated,
       regress_sqlstate($$SELECT kv_vectorize('other', 'body', 'e', profile => 'no_such_profile')$$) AS profile,
       regress_sqlstate($$SELECT kv_vectorize('other', 'body', 'e', batch_size => 0)$$) AS batch;
-- Without a profile the queue embeds with kvembed.model: refused while the
-- session has chosen another model.
SET kvembed.use_model = 'another';
SELECT regress_sqlstate($$SELECT kv_vectorize('other', 'body', 'emb')$$) AS use_model_without_profile;
RESET kvembed.use_model;
CREATE ROLE regress_queue_stranger;
GRANT SELECT ON docs TO regress_queue_stranger;
SET ROLE regress_queue_stranger;
SELECT regress_sqlstate($$SELECT kv_vectorize('other', 'body', 'e')$$) AS not_owner,
       regress_sqlstate($$SELECT kv_unvectorize('docs')$$) AS unvectorize_not_owner,
       regress_sqlstate($$SELECT kvembed.vectorize_batch('docs'::regclass)$$) AS worker_function;
-- A role sees the queues of the tables it may read, and no others.
SELECT table_name FROM kvembed.vectorized ORDER BY 1;
RESET ROLE;

-- kv_unvectorize(): the trigger and the index go, the vectors stay, a new
-- text is no longer embedded.
SELECT kv_unvectorize('docs') AS removed, kv_unvectorize('docs') AS again;
UPDATE docs SET body = 'after the queue' WHERE id = 6;
SELECT emb IS NOT NULL AS kept FROM docs WHERE id = 6;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'docs'::regclass;
SELECT count(*) AS indexes FROM pg_indexes WHERE tablename = 'docs' AND indexname LIKE '%kvembed%';
SELECT kv_unvectorize('notes') AS removed;
SELECT count(*) AS vectorized FROM kvembed.vectorized;

-- With no vectorized table left the worker exits (so that this database can
-- be dropped without FORCE).
DO $$
BEGIN
  FOR i IN 1..300 LOOP
    EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity
                           WHERE backend_type = 'kvembed queue' AND datname = current_database());
    PERFORM pg_sleep(0.1);
  END LOOP;
END
$$;
SELECT count(*) AS queue_workers FROM pg_stat_activity
 WHERE backend_type = 'kvembed queue' AND datname = current_database();

DROP TABLE docs, notes, other CASCADE;
DROP ROLE regress_queue_stranger;
SELECT kv_drop_profile('regress_queue');
DROP FUNCTION regress_sqlstate(text), regress_drained(regclass);
