-- kvembed 0.1.0 -> 0.2.0 (ALTER EXTENSION kvembed UPDATE TO '0.2.0')
--
-- New in 0.2.0:
-- * kv_debug_fault(text): fault injection for fault-isolation testing,
--   superusers only;
-- * the kvembed.engine_memory_limit setting, which kvembed_admin may change
--   with ALTER SYSTEM like the other engine settings.
-- Every other object is unchanged. The 0.2.0 library serves both versions'
-- functions (no C symbol was renamed or removed).

CREATE FUNCTION @extschema@."kv_debug_fault"(
	"kind" TEXT /* &str */
) RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'kv_debug_fault_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.kv_debug_fault(text) FROM PUBLIC;

GRANT ALTER SYSTEM ON PARAMETER kvembed.engine_memory_limit TO kvembed_admin;
