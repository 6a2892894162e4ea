-- kvembed install script, part 1 (runs before the functions pgrx generates).
--
-- Internal objects live in the schema "kvembed" (created by pgrx for the
-- helper functions); the user-facing functions (kv_*) are created in the
-- extension's schema (CREATE EXTENSION ... SCHEMA, default: the first schema
-- on the search_path, usually public).

-- Members of kvembed_admin may store calibrations, restart the engine, and
-- change what the engine loads with ALTER SYSTEM. Roles are cluster-wide, so
-- the role is shared by every database that installs kvembed and is left in
-- place by DROP EXTENSION.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'kvembed_admin') THEN
    CREATE ROLE kvembed_admin NOLOGIN;
  END IF;
END
$$;
GRANT ALTER SYSTEM ON PARAMETER kvembed.model, kvembed.device, kvembed.threads, kvembed.batch_tokens,
  kvembed.engine_memory_limit, kvembed.max_tokens_limit, kvembed.max_calibration_texts
  TO kvembed_admin;
