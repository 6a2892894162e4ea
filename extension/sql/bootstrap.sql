-- kvembed install script, part 1 (runs before the functions pgrx generates).
--
-- Internal objects live in the schema "kvembed"; the user-facing functions
-- (kv_*) are created in the extension's schema (CREATE EXTENSION ... SCHEMA,
-- default: the first schema on the search_path, usually public).

CREATE SCHEMA kvembed;
COMMENT ON SCHEMA kvembed IS 'kvembed internals: the stored layer calibration and helper functions';
GRANT USAGE ON SCHEMA kvembed TO PUBLIC;

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
GRANT ALTER SYSTEM ON PARAMETER kvembed.model, kvembed.device, kvembed.threads, kvembed.batch_tokens
  TO kvembed_admin;

-- One layer selection per model identity, written by kv_select_layers() and
-- used by kv_embed() while kvembed.layers = 'auto'.
CREATE TABLE kvembed.calibration (
  model_id    text PRIMARY KEY,
  layers      int[] NOT NULL,
  curve       jsonb NOT NULL,
  rule        text,
  source      text,
  sample_size int,
  created_by  name NOT NULL DEFAULT current_user,
  created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE kvembed.calibration IS 'Layer selections made by kv_select_layers(), one per model';
REVOKE ALL ON kvembed.calibration FROM PUBLIC;
GRANT SELECT ON kvembed.calibration TO PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON kvembed.calibration TO kvembed_admin;
-- pg_dump keeps calibrations (the table belongs to the extension).
SELECT pg_catalog.pg_extension_config_dump('kvembed.calibration', '');
