//! kvembed: text embeddings from a frozen decoder LLM (KV-Embedding) as
//! pgvector values.
//!
//! This crate is the PostgreSQL side only and stays thin: it parses SQL
//! arguments, sends requests to the engine and builds `vector` values. The
//! model runs in a separate process, `kvembed serve`, which a background
//! worker supervises; sessions never load model weights and an inference
//! crash never restarts the cluster.
//!
//! | file            | concept                                                    |
//! |-----------------|------------------------------------------------------------|
//! | `settings.rs`   | the `kvembed.*` settings and the request options they make |
//! | `worker.rs`     | the supervisor background worker and its registration      |
//! | `client.rs`     | the session's connection to the engine, interruptible waits |
//! | `text.rs`       | SQL `text` to UTF-8, whatever the database encoding        |
//! | `vector.rs`     | pgvector `vector` / `halfvec` values built directly        |
//! | `calibration.rs`| the stored layer selection used when `kvembed.layers = auto` |
//! | `queue.rs`      | `kv_vectorize`: the per-database worker that embeds pending rows |
//! | `api.rs`        | the SQL functions                                          |
//! | `sql/`          | hand-written SQL: schema, tables, procedures, upgrades     |

use pgrx::prelude::*;

mod api;
mod calibration;
mod client;
mod profile;
mod queue;
mod settings;
mod text;
mod vector;
mod worker;

::pgrx::pg_module_magic!(name, version);

// Hand-written SQL: the internal schema, role and tables first, the PL/pgSQL
// procedures that call the Rust functions last.
pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // pgrx attaches a Rust backtrace to every ERROR raised through Rust when
    // RUST_BACKTRACE is set in the server's environment: a cancelled
    // kv_embed would print 50 frames of DETAIL, and capturing costs
    // milliseconds. Opt in explicitly with RUST_LIB_BACKTRACE=1.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // PostgreSQL processes are single-threaded when libraries load, so
        // nothing reads the environment concurrently.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    settings::define();
    // SAFETY: reading a PostgreSQL global that is only written by the
    // postmaster while it processes shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        worker::register_at_startup();
    }
}
