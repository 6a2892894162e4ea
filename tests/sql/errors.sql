-- kvembed regression tests: errors and their SQLSTATEs.
-- Texts over kvembed.max_tokens (truncated with a NOTICE, or refused with
-- 54000), bad arguments, a cancelled wait (57014), invalid UTF-8 (22021)
-- and conversion from other encodings; after each error the session goes on.
-- Settings errors are in settings.sql, privileges in privileges.sql.
\set VERBOSITY terse

-- Runs a statement and returns 'ok' or its SQLSTATE (and message).
CREATE FUNCTION regress_error(q text, with_message boolean DEFAULT true)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || CASE WHEN with_message THEN ' ' || SQLERRM ELSE '' END;
END
$$;

-- Texts of known length in tokens (of this model's tokenizer).
CREATE TABLE regress_texts (n int PRIMARY KEY, body text);
INSERT INTO regress_texts VALUES (3, repeat('lorem ipsum dolor sit amet ', 3)),   -- 32 tokens
                                 (5, repeat('lorem ipsum dolor sit amet ', 5)),   -- 52 tokens
                                 (10, repeat('lorem ipsum dolor sit amet ', 10)); -- 102 tokens

-- on_overflow = 'truncate' (the default): the first max_tokens tokens are
-- kept, with a NOTICE.
SET kvembed.max_tokens = 16;
SELECT vector_dims(kv_embed(body)) AS dims, abs(vector_norm(kv_embed(body)) - 1) < 1e-4 AS unit
  FROM regress_texts WHERE n = 10;
-- Texts with the same first 16 tokens give the same vector...
SELECT (kv_embed((SELECT body FROM regress_texts WHERE n = 10))
        <=> kv_embed((SELECT body FROM regress_texts WHERE n = 5))) < 1e-5 AS same_first_16_tokens;
-- ...and keeping 32 tokens gives another one.
CREATE TABLE regress_kept (max_tokens int, v vector);
INSERT INTO regress_kept SELECT 16, kv_embed(body) FROM regress_texts WHERE n = 10;
SET kvembed.max_tokens = 32;
INSERT INTO regress_kept SELECT 32, kv_embed(body) FROM regress_texts WHERE n = 10;
SELECT (a.v <=> b.v) > 1e-3 AS more_tokens_other_vector
  FROM regress_kept a, regress_kept b WHERE a.max_tokens = 16 AND b.max_tokens = 32;
SET kvembed.max_tokens = 16;
-- A batch reports its truncated texts in one NOTICE.
SELECT cardinality(kv_embed_batch(ARRAY[(SELECT body FROM regress_texts WHERE n = 10), 'short', NULL,
                                        (SELECT body FROM regress_texts WHERE n = 3)])) AS n;
-- Texts within the limit are not truncated and give the vectors they give
-- without a limit.
INSERT INTO regress_kept VALUES (-16, kv_embed('A short text.'));
RESET kvembed.max_tokens;
INSERT INTO regress_kept VALUES (-512, kv_embed('A short text.'));
SELECT (a.v <=> b.v) < 1e-5 AS short_unaffected
  FROM regress_kept a, regress_kept b WHERE a.max_tokens = -16 AND b.max_tokens = -512;
SHOW kvembed.max_tokens;

-- on_overflow = 'error': a text over the limit is refused (54000), its
-- index (from 0) named; texts within the limit still embed.
SET kvembed.max_tokens = 16;
SET kvembed.on_overflow = 'error';
SELECT kv_embed(body) FROM regress_texts WHERE n = 3;
SELECT regress_error($q$SELECT kv_embed(body) FROM regress_texts WHERE n = 3$q$) AS single,
       regress_error($q$SELECT kv_embed_batch(ARRAY['short', body]) FROM regress_texts WHERE n = 3$q$, false) AS batch,
       regress_error($q$SELECT kv_embed_half(body, 'query') FROM regress_texts WHERE n = 10$q$, false) AS half_query;
SELECT vector_dims(kv_embed('one two three four five six seven eight nine ten')) AS within_limit;
-- The refused text is named by its place: an array's element (from 1,
-- NULLs counted), also past the first request of 256 texts.
SELECT regress_error($q$SELECT kv_embed_batch(ARRAY[NULL, NULL, 'short', body]) FROM regress_texts WHERE n = 3$q$) AS fourth;
SELECT regress_error($q$SELECT kv_embed_batch(array_fill('short'::text, ARRAY[300]) || body) FROM regress_texts WHERE n = 3$q$) AS element_301;
-- A huge text is refused too, without tokenising all of it: its length is
-- "more than" the limit...
SELECT regress_error($q$SELECT kv_embed(repeat('x', 10000000))$q$) AS huge_refused;
-- ...and with truncation it is cut before it is tokenised, so its NOTICE
-- gives what was counted as a lower bound ("at least")...
SET kvembed.on_overflow = 'truncate';
SELECT vector_dims(kv_embed(repeat('x', 100000))) AS cut_dims;
SELECT cardinality(kv_embed_batch(ARRAY['short', repeat('x', 100000)])) AS cut_batch;
-- ...and it costs no more than a short one: cut to its first 16 tokens like
-- a shorter run of the same character.
SET client_min_messages = warning;
SELECT vector_dims(kv_embed(repeat('x', 10000000))) AS huge_dims,
       (kv_embed(repeat('x', 10000000)) <=> kv_embed(repeat('x', 4096))) < 1e-5 AS huge_is_its_start;
RESET client_min_messages;
RESET kvembed.max_tokens;
RESET kvembed.on_overflow;

-- Other argument errors.
SELECT regress_error($q$SELECT kv_embed('x', 'banana')$q$) AS unknown_role;
SELECT regress_error($q$SELECT kv_debug_fault('bogus')$q$) AS unknown_fault,
       regress_error($q$SELECT kv_debug_fault('stall:soon')$q$) AS bad_stall;

-- A statement_timeout interrupts a statement waiting for the engine
-- (57014). The engine's next batch is made to stall for a second (fault
-- injection, superusers only), so that this holds on any hardware.
SELECT kv_debug_fault('stall:1000') > 0 AS armed;
SET statement_timeout = '100ms';
SELECT kv_embed('this request waits on a stalled engine');
RESET statement_timeout;
SELECT vector_dims(kv_embed('after the timeout')) AS dims;

-- An error inside a transaction aborts it like any other.
BEGIN;
SELECT vector_dims(kv_embed('inside a transaction')) AS dims;
SELECT kv_embed('x', 'banana');
SELECT 1;
ROLLBACK;
SELECT vector_dims(kv_embed('after the rollback')) AS dims;

-- Encodings. Text from a database in another encoding is converted to
-- UTF-8 and embeds as in a UTF-8 database; a SQL_ASCII database stores any
-- bytes, and text that is not valid UTF-8 is refused (22021).
SELECT kv_embed('café au lait')::text AS cafe \gset
\set regress_db :DBNAME
SET client_min_messages = warning;
DROP DATABASE IF EXISTS regress_kvembed_latin1;
DROP DATABASE IF EXISTS regress_kvembed_ascii;
RESET client_min_messages;
CREATE DATABASE regress_kvembed_latin1 ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';
CREATE DATABASE regress_kvembed_ascii ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';
\c regress_kvembed_latin1
\set VERBOSITY terse
SET client_encoding = 'UTF8';
SET client_min_messages = warning;
CREATE EXTENSION kvembed CASCADE;
RESET client_min_messages;
SELECT (kv_embed('café au lait') <=> :'cafe'::vector) < 1e-5 AS latin1_same_as_utf8;
SELECT kv_embed('x', 'rôle');
\c regress_kvembed_ascii
\set VERBOSITY terse
SET client_min_messages = warning;
CREATE EXTENSION kvembed CASCADE;
RESET client_min_messages;
SELECT (kv_embed('café au lait') <=> :'cafe'::vector) < 1e-5 AS sql_ascii_same_as_utf8;
CREATE FUNCTION regress_sqlstate(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE;
END
$$;
SELECT regress_sqlstate($q$SELECT kv_embed(E'bad \xff byte')$q$) AS invalid_text,
       regress_sqlstate($q$SELECT kv_embed_batch(ARRAY['ok', E'bad \xff'])$q$) AS invalid_in_batch,
       regress_sqlstate($q$SELECT kv_embed('x', E'r\xf4le')$q$) AS invalid_role;
SELECT vector_dims(kv_embed('still working')) AS dims;
\c :regress_db
\set VERBOSITY terse
DROP DATABASE regress_kvembed_latin1;
DROP DATABASE regress_kvembed_ascii;

DROP TABLE regress_texts, regress_kept;
DROP FUNCTION regress_error(text, boolean);
