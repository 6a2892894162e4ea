//! The stored layer selection (`kvembed.calibration`) that `kv_embed` uses
//! when `kvembed.layers = 'auto'`.
//!
//! One row per model identity, written by `kv_select_layers()`. Reading it
//! costs one indexed SPI lookup per statement: the answer is cached for the
//! rest of the statement (a COPY of a million rows reads it once), and a new
//! statement sees a calibration stored by any session since.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::RefCell;

struct Cached {
    statement_start: pg_sys::TimestampTz,
    model_id: String,
    layers: Option<Vec<usize>>,
}

thread_local! {
    static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// The calibrated layers for `model_id`, if a calibration is stored.
pub fn layers_for(model_id: &str) -> Option<Vec<usize>> {
    if model_id.is_empty() {
        return None;
    }
    // SAFETY: reads the current statement's start time; no arguments.
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let hit = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|c| c.statement_start == now && c.model_id == model_id)
            .map(|c| c.layers.clone())
    });
    if let Some(layers) = hit {
        return layers;
    }
    let layers = read(model_id);
    CACHE.with(|c| {
        *c.borrow_mut() = Some(Cached {
            statement_start: now,
            model_id: model_id.to_string(),
            layers: layers.clone(),
        })
    });
    layers
}

/// Forget the cached answer (after `kv_select_layers` stored a new one).
pub fn invalidate() {
    CACHE.with(|c| *c.borrow_mut() = None);
}

fn read(model_id: &str) -> Option<Vec<usize>> {
    let query = "SELECT layers FROM kvembed.calibration WHERE model_id = $1";
    let args = [model_id.into()];
    let layers: Option<Vec<Option<i32>>> = Spi::connect(|client| {
        let table = client.select(query, Some(1), &args)?;
        if table.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        table.first().get_one::<Vec<Option<i32>>>()
    })
    .unwrap_or_else(|e| {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("kvembed: cannot read kvembed.calibration: {e}"),
            "kvembed",
        )
        .report(PgLogLevel::ERROR);
        unreachable!()
    });
    let layers: Vec<usize> = layers?
        .into_iter()
        .flatten()
        .filter(|l| *l >= 0)
        .map(|l| l as usize)
        .collect();
    (!layers.is_empty()).then_some(layers)
}
