//! pgvector values built directly, without a `real[]` round trip.
//!
//! pgvector's on-disk layouts (vector.h / halfvec.h):
//!
//! ```text
//! vector:  int32 vl_len_; int16 dim; int16 unused; float4 x[dim];
//! halfvec: int32 vl_len_; int16 dim; int16 unused; half   x[dim];
//! ```
//!
//! Both allow at most 16,000 dimensions. HNSW indexes `vector` up to 2,000
//! dimensions and `halfvec` up to 4,000, hence `kv_embed_half` for wide
//! backbones.

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{impl_sql_translatable, IntoDatum};
use std::ffi::CStr;

/// pgvector's VECTOR_MAX_DIM and HALFVEC_MAX_DIM.
pub const MAX_DIM: usize = 16_000;

/// A pgvector `vector`.
pub struct Vector(pub Vec<f32>);

/// A pgvector `halfvec` (values are rounded to IEEE half precision).
pub struct HalfVec(pub Vec<f32>);

impl_sql_translatable!(Vector, "vector");
impl_sql_translatable!(HalfVec, "halfvec");

impl IntoDatum for Vector {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|v| v.to_ne_bytes()).collect();
        Some(build_varlena(self.0.len(), &bytes, "vector"))
    }

    fn type_oid() -> pg_sys::Oid {
        pgvector_type_oid(c"vector")
    }
}

impl IntoDatum for HalfVec {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let bytes: Vec<u8> = self
            .0
            .iter()
            .flat_map(|v| f32_to_f16_bits(*v).to_ne_bytes())
            .collect();
        Some(build_varlena(self.0.len(), &bytes, "halfvec"))
    }

    fn type_oid() -> pg_sys::Oid {
        pgvector_type_oid(c"halfvec")
    }
}

// SAFETY: both return a freshly palloc'd varlena of their SQL type.
unsafe impl BoxRet for Vector {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            // SAFETY: a valid `vector` datum for a function returning vector.
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

// SAFETY: as for Vector.
unsafe impl BoxRet for HalfVec {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            // SAFETY: a valid `halfvec` datum for a function returning halfvec.
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

/// `{int32 vl_len_; int16 dim; int16 unused; payload}` in a palloc'd chunk.
fn build_varlena(dim: usize, payload: &[u8], type_name: &str) -> pg_sys::Datum {
    if dim == 0 || dim > MAX_DIM {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "kvembed: a {type_name} needs 1 to {MAX_DIM} dimensions, the model produced {dim}"
            ),
            "kvembed",
        )
        .report(PgLogLevel::ERROR);
    }
    let header = 8usize; // VARHDRSZ + dim + unused
    let size = header + payload.len();
    // SAFETY: palloc0 returns `size` zeroed, MAXALIGNed bytes in the current
    // memory context (or raises an ERROR); we write exactly within them: the
    // 4-byte varlena header, the int16 dim at offset 4 (int16 unused stays
    // 0), and the payload from offset 8.
    unsafe {
        let ptr = pg_sys::palloc0(size) as *mut u8;
        pgrx::set_varsize_4b(ptr as *mut pg_sys::varlena, size as i32);
        (ptr.add(4) as *mut i16).write_unaligned(dim as i16);
        std::ptr::copy_nonoverlapping(payload.as_ptr(), ptr.add(header), payload.len());
        pg_sys::Datum::from(ptr)
    }
}

/// The OID of a pgvector type, looked up in the schema pgvector was
/// installed in (which need not be on the search_path).
fn pgvector_type_oid(name: &CStr) -> pg_sys::Oid {
    // SAFETY: catalog lookups by name (the type-name cache takes a C string
    // and a namespace OID); each returns InvalidOid when nothing matches.
    unsafe {
        let ext = pg_sys::get_extension_oid(c"vector".as_ptr(), true);
        if ext != pg_sys::InvalidOid {
            let schema = extension_schema(ext);
            let oid = pg_sys::GetSysCacheOid(
                pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
                pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
                pg_sys::Datum::from(name.as_ptr()),
                pg_sys::Datum::from(schema),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            );
            if oid != pg_sys::InvalidOid {
                return oid;
            }
        }
    }
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!(
            "kvembed: type {} from the vector extension (pgvector) was not found",
            name.to_string_lossy()
        ),
        "kvembed",
    )
    .set_hint("CREATE EXTENSION vector; (CREATE EXTENSION kvembed CASCADE installs it)")
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// The schema an extension was installed in.
#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
unsafe fn extension_schema(ext: pg_sys::Oid) -> pg_sys::Oid {
    pg_sys::get_extension_schema(ext)
}

/// The schema an extension was installed in: PostgreSQL exports
/// `get_extension_schema()` from 16 on; before, this is its body (one
/// lookup of pg_extension by OID through its index).
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
unsafe fn extension_schema(ext: pg_sys::Oid) -> pg_sys::Oid {
    let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    let rel = pg_sys::table_open(pg_sys::ExtensionRelationId, lock);
    let mut key = std::mem::MaybeUninit::<pg_sys::ScanKeyData>::zeroed();
    pg_sys::ScanKeyInit(
        key.as_mut_ptr(),
        pg_sys::Anum_pg_extension_oid as pg_sys::AttrNumber,
        pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
        pg_sys::Oid::from(pg_sys::F_OIDEQ),
        pg_sys::Datum::from(ext),
    );
    let scan = pg_sys::systable_beginscan(
        rel,
        pg_sys::Oid::from(pg_sys::ExtensionOidIndexId),
        true,
        std::ptr::null_mut(),
        1,
        key.as_mut_ptr(),
    );
    let tuple = pg_sys::systable_getnext(scan);
    let schema = if tuple.is_null() {
        pg_sys::InvalidOid
    } else {
        (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_extension>(tuple)).extnamespace
    };
    pg_sys::systable_endscan(scan);
    pg_sys::table_close(rel, lock);
    schema
}

/// IEEE 754 binary16 bits of `v`, rounded to nearest even (what pgvector's
/// own float4 → half conversion does). Values beyond the half range become
/// infinity; embeddings are L2-normalised, so |v| <= 1 and that never happens.
pub fn f32_to_f16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x007f_ffff;
    if exp == 0xff {
        // Inf or NaN (keep NaN quiet and non-zero).
        return sign | 0x7c00 | if mant != 0 { 0x0200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00; // overflow
    }
    if e <= 0 {
        // Subnormal half (or zero): shift the implicit-1 mantissa into place.
        if e < -10 {
            return sign;
        }
        let m = mant | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round_up = rem > halfway || (rem == halfway && (half & 1) == 1);
        return sign | (half + round_up as u32) as u16;
    }
    let half = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    let round_up = rem > 0x1000 || (rem == 0x1000 && (half & 1) == 1);
    // A carry out of the mantissa correctly bumps the exponent (even to inf).
    sign | (half + round_up as u32) as u16
}
