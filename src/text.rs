//! SQL `text` arguments as UTF-8 strings, whatever the database encoding.
//!
//! pgrx's `&str` trusts UTF-8 databases blindly and panics on anything else;
//! the engine needs UTF-8 and the user needs a clear error. `DbText` takes
//! the raw bytes, and `into_utf8` converts them from the database encoding
//! (or, in a `SQL_ASCII` database, where PostgreSQL checks nothing, refuses
//! invalid UTF-8 with SQLSTATE 22021).

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::datum::{Datum, UnboxDatum};
use pgrx::nullable::Nullable;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{impl_sql_translatable, FromDatum};

/// The bytes of one SQL `text` value, in the database encoding.
pub struct DbText(Vec<u8>);

impl_sql_translatable!(DbText, "text");

/// Copies the bytes out of a (possibly toasted or short-header) text datum.
///
/// # Safety
/// `datum` must be a non-null `text` (or other varlena) datum.
unsafe fn text_bytes(datum: pg_sys::Datum) -> Vec<u8> {
    // SAFETY (whole block): the caller guarantees a text datum; detoasting
    // returns a readable varlena whose header tells its payload length.
    unsafe {
        let varlena = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(varlena);
        let data = pgrx::varlena::vardata_any(varlena) as *const u8;
        std::slice::from_raw_parts(data, len).to_vec()
    }
}

impl FromDatum for DbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null || datum.is_null() {
            None
        } else {
            // SAFETY: PostgreSQL passes a non-null text datum here.
            Some(DbText(unsafe { text_bytes(datum) }))
        }
    }
}

// SAFETY: `DbText` owns a copy of the bytes, so it borrows nothing from the
// datum's memory and `As<'src>` can be the type itself.
unsafe impl UnboxDatum for DbText {
    type As<'src> = DbText;
    unsafe fn unbox<'src>(datum: Datum<'src>) -> DbText
    where
        Self: 'src,
    {
        // SAFETY: array elements of a text[] are non-null text datums here.
        DbText(unsafe { text_bytes(datum.sans_lifetime()) })
    }
}

// SAFETY: arguments are unboxed through `FromDatum` above, which copies the
// bytes; a NULL argument never reaches `unbox_arg_unchecked` (the functions
// are STRICT) and is `Nullable::Null` otherwise.
unsafe impl<'fcx> ArgAbi<'fcx> for DbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        // SAFETY: the caller guarantees a non-null text argument.
        unsafe { arg.unbox_arg_using_from_datum() }.expect("text argument must not be null")
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above; NULL becomes Nullable::Null.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

impl DbText {
    pub fn from_bytes(bytes: Vec<u8>) -> DbText {
        DbText(bytes)
    }

    /// The bytes, in the database encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Byte offsets in the database encoding of character positions (counted
    /// from 0) given in increasing order, in one walk over the text.
    pub fn char_offsets(&self, positions: impl IntoIterator<Item = usize>) -> Vec<usize> {
        // SAFETY: reads the session's database encoding; no arguments.
        let encoding = unsafe { pg_sys::GetDatabaseEncoding() };
        let mut out = Vec::new();
        let (mut byte, mut chars) = (0usize, 0usize);
        for p in positions {
            if p < chars {
                (byte, chars) = (0, 0);
            }
            while chars < p && byte < self.0.len() {
                // SAFETY: `byte` is inside the buffer, at a character start;
                // pg_encoding_mblen reads the character's leading byte.
                let len = unsafe {
                    pg_sys::pg_encoding_mblen(encoding, self.0.as_ptr().add(byte).cast())
                };
                byte += len.max(1) as usize;
                chars += 1;
            }
            out.push(byte.min(self.0.len()));
        }
        out
    }

    /// The text as UTF-8, converted from the database encoding; an ERROR
    /// (never a crash) when that is impossible.
    pub fn into_utf8(self) -> String {
        // SAFETY: reads the session's database encoding; no arguments.
        let encoding = unsafe { pg_sys::GetDatabaseEncoding() } as u32;
        if encoding == pg_sys::pg_enc::PG_UTF8 || self.0.is_ascii() {
            return match String::from_utf8(self.0) {
                Ok(s) => s,
                Err(e) => invalid_utf8(e.utf8_error().valid_up_to()),
            };
        }
        if encoding == pg_sys::pg_enc::PG_SQL_ASCII {
            // PostgreSQL stores any bytes in SQL_ASCII; only UTF-8 can be embedded.
            return match String::from_utf8(self.0) {
                Ok(s) => s,
                Err(e) => invalid_utf8(e.utf8_error().valid_up_to()),
            };
        }
        // Any other server encoding is valid by construction: convert it.
        let len = self.0.len() as i32;
        // SAFETY: pg_do_encoding_conversion reads `len` bytes and returns either
        // the input pointer (nothing to convert) or a new NUL-terminated
        // palloc'd string; it raises a PostgreSQL ERROR for unconvertible input.
        unsafe {
            let src = self.0.as_ptr() as *mut u8;
            let out = pg_sys::pg_do_encoding_conversion(
                src,
                len,
                encoding as i32,
                pg_sys::pg_enc::PG_UTF8 as i32,
            );
            if out == src {
                return String::from_utf8_lossy(&self.0).into_owned();
            }
            let converted = std::ffi::CStr::from_ptr(out as *const std::ffi::c_char);
            String::from_utf8_lossy(converted.to_bytes()).into_owned()
        }
    }
}

/// The database encoding, as far as text handling cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    /// Any bytes; a character is a byte.
    SqlAscii,
    Other,
}

pub fn database_encoding() -> Encoding {
    // SAFETY: reads the session's database encoding; no arguments.
    match unsafe { pg_sys::GetDatabaseEncoding() } as u32 {
        pg_sys::pg_enc::PG_UTF8 => Encoding::Utf8,
        pg_sys::pg_enc::PG_SQL_ASCII => Encoding::SqlAscii,
        _ => Encoding::Other,
    }
}

/// A `text` result made of bytes already in the database encoding (a slice
/// of a [`DbText`]).
pub struct DbTextOut(pub Vec<u8>);

impl_sql_translatable!(DbTextOut, "text");

impl DbTextOut {
    /// UTF-8 text converted to the database encoding (as is in UTF-8 and
    /// SQL_ASCII databases).
    pub fn from_utf8(s: &str) -> DbTextOut {
        if s.is_ascii() || database_encoding() != Encoding::Other {
            return DbTextOut(s.as_bytes().to_vec());
        }
        // SAFETY: pg_any_to_server reads `len` bytes and returns either its
        // input (nothing to convert) or a new NUL-terminated palloc'd string;
        // it raises a PostgreSQL ERROR for unconvertible input.
        unsafe {
            let src = s.as_ptr() as *const std::ffi::c_char;
            let out = pg_sys::pg_any_to_server(src, s.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
            if out as *const std::ffi::c_char == src {
                return DbTextOut(s.as_bytes().to_vec());
            }
            DbTextOut(std::ffi::CStr::from_ptr(out).to_bytes().to_vec())
        }
    }
}

impl pgrx::IntoDatum for DbTextOut {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        // SAFETY: copies `len` bytes into a new palloc'd text varlena.
        let text = unsafe {
            pg_sys::cstring_to_text_with_len(self.0.as_ptr().cast(), self.0.len() as i32)
        };
        Some(pg_sys::Datum::from(text))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }
}

// SAFETY: returns a freshly palloc'd `text` datum.
unsafe impl pgrx::callconv::BoxRet for DbTextOut {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        match pgrx::IntoDatum::into_datum(self) {
            // SAFETY: a valid `text` datum for a column of type text.
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

/// `s` as it may appear in a message: PostgreSQL takes message text to be
/// in the database encoding and converts it for the client, so in a
/// database that is neither UTF-8 nor SQL_ASCII the UTF-8 bytes of a
/// non-ASCII character would reach the client garbled (`rÃ´le`). There,
/// non-ASCII characters are written as `\u{f4}` escapes instead.
pub fn for_message(s: &str) -> String {
    // SAFETY: reads the session's database encoding; no arguments.
    let encoding = unsafe { pg_sys::GetDatabaseEncoding() } as u32;
    if s.is_ascii()
        || encoding == pg_sys::pg_enc::PG_UTF8
        || encoding == pg_sys::pg_enc::PG_SQL_ASCII
    {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                c.escape_unicode().to_string()
            }
        })
        .collect()
}

fn invalid_utf8(offset: usize) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        format!("kvembed: text is not valid UTF-8 (invalid byte sequence at byte {offset})"),
        "kvembed",
    )
    .set_hint(
        "The database encoding is SQL_ASCII, which stores any bytes; kvembed can only embed UTF-8 text.",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}
