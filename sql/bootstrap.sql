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
--
-- An existing kvembed_admin is trusted only if it is what this script
-- creates: a plain NOLOGIN role whose members were all granted it by a
-- superuser, none with ADMIN OPTION. A role of that name created first by
-- someone else (a CREATEROLE user holds ADMIN OPTION on the roles it
-- creates) would otherwise receive control of the engine: installing over
-- it fails instead.
DO $$
DECLARE
  r record;
  doubtful text;
BEGIN
  SELECT oid, * INTO r FROM pg_catalog.pg_roles WHERE rolname = 'kvembed_admin';
  IF NOT FOUND THEN
    CREATE ROLE kvembed_admin NOLOGIN;
    RETURN;
  END IF;
  IF r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls THEN
    RAISE EXCEPTION 'kvembed: the existing role kvembed_admin is not the plain NOLOGIN role kvembed creates'
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'kvembed grants control of its engine to kvembed_admin. If that role is yours, make it NOLOGIN without other attributes; otherwise drop it and install again.';
  END IF;
  SELECT string_agg(format('%s (granted by %s%s)', m.member::regrole, m.grantor::regrole,
                           CASE WHEN m.admin_option THEN ', with ADMIN OPTION' ELSE '' END), ', ')
    INTO doubtful
    FROM pg_catalog.pg_auth_members m
    JOIN pg_catalog.pg_roles g ON g.oid = m.grantor
   WHERE m.roleid = r.oid AND (m.admin_option OR NOT g.rolsuper);
  IF doubtful IS NOT NULL THEN
    RAISE EXCEPTION 'kvembed: the existing role kvembed_admin has members a superuser did not grant it to, or who may grant it on: %', doubtful
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'kvembed grants control of its engine to kvembed_admin. A superuser should revoke those memberships (or drop the role if kvembed did not create it) and install again.';
  END IF;
END
$$;
GRANT ALTER SYSTEM ON PARAMETER kvembed.model, kvembed.models, kvembed.device, kvembed.threads, kvembed.batch_tokens,
  kvembed.engine_memory_limit, kvembed.max_tokens_limit, kvembed.max_calibration_texts
  TO kvembed_admin;
