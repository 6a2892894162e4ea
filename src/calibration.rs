//! The stored calibration (`kvembed.calibration`) that `kv_embed` uses
//! when `kvembed.layers = 'auto'`: the re-routed layers and, when
//! `kv_select_layers` fitted one, the corpus calibration of the space.
//!
//! One row per model identity, written by `kv_select_layers()`. Reading it
//! costs one indexed SPI lookup per statement: the answer is cached for the
//! rest of the statement (a COPY of a million rows reads it once), and a new
//! statement sees a calibration stored by any session since. The space map
//! (up to `dim x dim` values) is read again only when the row changed.

use kvembed_proto::{EmbedOptions, SpaceMap};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// A corpus calibration of the space, as stored.
pub struct StoredSpace {
    /// How it was fitted (`whiten:0.5`, ...).
    pub fit: String,
    /// The session options it was fitted for ([`options_key`]).
    pub options: serde_json::Value,
    pub map: SpaceMap,
    pub sample_size: i32,
}

/// The stored calibration of one model.
#[derive(Clone)]
pub struct Stored {
    pub layers: Option<Vec<usize>>,
    pub space: Option<Rc<StoredSpace>>,
}

struct Cached {
    statement_start: pg_sys::TimestampTz,
    model_id: String,
    /// The row's `created_at`, to tell whether the space must be re-read.
    version: Option<String>,
    stored: Option<Stored>,
}

thread_local! {
    static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// What a space calibration depends on among a session's options: the
/// method, the bias and the document prompt (the layers are the stored
/// ones; the length limits change only long texts).
pub fn options_key(o: &EmbedOptions) -> serde_json::Value {
    serde_json::json!({
        "method": o.method,
        "bias": o.bias,
        "document_prompt": o.document_prompt,
    })
}

/// The stored calibration for `model_id`, if one is stored.
pub fn stored_for(model_id: &str) -> Option<Stored> {
    if model_id.is_empty() {
        return None;
    }
    // SAFETY: reads the current statement's start time; no arguments.
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let previous = CACHE.with(|c| c.borrow_mut().take());
    if let Some(c) = &previous {
        if c.statement_start == now && c.model_id == model_id {
            let stored = c.stored.clone();
            CACHE.with(|cell| *cell.borrow_mut() = previous);
            return stored;
        }
    }
    let (version, layers, has_space) = read_row(model_id);
    let stored = version.as_ref().map(|_| {
        let space = if !has_space {
            None
        } else {
            match &previous {
                // Same row as before: keep the map already read.
                Some(c) if c.model_id == model_id && c.version == version => {
                    c.stored.as_ref().and_then(|s| s.space.clone())
                }
                _ => read_space(model_id).map(Rc::new),
            }
        };
        Stored { layers, space }
    });
    CACHE.with(|c| {
        *c.borrow_mut() = Some(Cached {
            statement_start: now,
            model_id: model_id.to_string(),
            version,
            stored: stored.clone(),
        })
    });
    stored
}

/// Forget the cached answer (after `kv_select_layers` stored a new one).
pub fn invalidate() {
    CACHE.with(|c| *c.borrow_mut() = None);
}

fn fail(e: impl std::fmt::Display) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("kvembed: cannot read kvembed.calibration: {e}"),
        "kvembed",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// The row's version (`created_at`, `None` without a row), its layers, and
/// whether it holds a space calibration.
fn read_row(model_id: &str) -> (Option<String>, Option<Vec<usize>>, bool) {
    let query = "SELECT created_at::text, layers, space_fit IS NOT NULL \
                 FROM kvembed.calibration WHERE model_id = $1";
    let args = [model_id.into()];
    let row = Spi::connect(|client| {
        let table = client.select(query, Some(1), &args)?;
        if table.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let row = table.first();
        Ok(Some((
            row.get::<String>(1)?,
            row.get::<Vec<Option<i32>>>(2)?,
            row.get::<bool>(3)?.unwrap_or(false),
        )))
    })
    .unwrap_or_else(|e| fail(e));
    let Some((version, layers, has_space)) = row else {
        return (None, None, false);
    };
    let layers: Vec<usize> = layers
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .filter(|l| *l >= 0)
        .map(|l| l as usize)
        .collect();
    (
        Some(version.unwrap_or_default()),
        (!layers.is_empty()).then_some(layers),
        has_space,
    )
}

fn read_space(model_id: &str) -> Option<StoredSpace> {
    let query =
        "SELECT space_fit, space_options, space_mean, space_directions, space_gains, sample_size \
                 FROM kvembed.calibration WHERE model_id = $1 AND space_fit IS NOT NULL";
    let args = [model_id.into()];
    let floats = |v: Option<Vec<Option<f32>>>| -> Vec<f32> {
        v.unwrap_or_default()
            .into_iter()
            .map(|x| x.unwrap_or(f32::NAN))
            .collect()
    };
    let space = Spi::connect(|client| {
        let table = client.select(query, Some(1), &args)?;
        if table.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let row = table.first();
        Ok(Some(StoredSpace {
            fit: row.get::<String>(1)?.unwrap_or_default(),
            options: row
                .get::<pgrx::JsonB>(2)?
                .map(|j| j.0)
                .unwrap_or(serde_json::Value::Null),
            map: SpaceMap {
                mean: floats(row.get(3)?),
                directions: floats(row.get(4)?),
                gains: floats(row.get(5)?),
            },
            sample_size: row.get::<i32>(6)?.unwrap_or(0),
        }))
    })
    .unwrap_or_else(|e| fail(e))?;
    if let Err(e) = space.map.validate() {
        fail(format!(
            "the space calibration of model '{model_id}' is damaged ({e}); run kv_select_layers() again"
        ));
    }
    Some(space)
}
