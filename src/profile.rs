//! Embedding profiles (`kvembed.profiles`): named, frozen embedding
//! settings (the model they were made with, the method resolved to its
//! layers, bias and prompts, the length limit, and the space calibration in
//! force) that `kv_embed(text, role, profile)` and `kvembed.profile` use
//! instead of the session's settings. A vector made under a profile is
//! made the same way in every session, and never by another model: a
//! profile whose model is not the loaded one is an ERROR.
//!
//! A profile is read once per statement (an indexed SPI lookup) and cached
//! for the rest of it.

use crate::calibration::StoredSpace;
use crate::client;
use kvembed_proto::{EmbedOptions, SpaceMap};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// A profile as stored.
#[derive(Clone)]
pub struct Profile {
    pub model_id: String,
    /// The model's content fingerprint (empty for a profile made before
    /// engines reported one: then `model_id` is checked).
    pub fingerprint: String,
    pub options: EmbedOptions,
    pub space: Option<Rc<StoredSpace>>,
}

struct Cached {
    statement_start: pg_sys::TimestampTz,
    name: String,
    profile: Profile,
}

thread_local! {
    static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// The request options and space map of profile `name`, checked against
/// the loaded model.
pub fn options_for(name: &str) -> (EmbedOptions, Option<Rc<StoredSpace>>) {
    let profile = read(name);
    // The profile's model among those the engine serves: the same weights,
    // wherever they lie now and whatever they are called; by identity
    // where the profile has no fingerprint.
    let (found, served) = client::with_engine(true, |e| {
        let found = e
            .status
            .models
            .iter()
            .filter(|m| m.state == kvembed_proto::EngineState::Ready)
            .find(|m| {
                if profile.fingerprint.is_empty() {
                    m.model_id == profile.model_id
                } else {
                    m.fingerprint == profile.fingerprint
                }
            })
            .map(|m| (m.name.clone(), m.model_id.clone()));
        let first = e.status.first();
        Ok((
            found,
            (e.status.model_names(), first.model_id, first.fingerprint),
        ))
    });
    let Some((model_name, loaded)) = found else {
        let (names, loaded, loaded_fingerprint) = served;
        let short = |f: &str| f.chars().take(19).collect::<String>();
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "kvembed: profile '{}' was made with model '{}' ({}), but the engine serves '{}' ({}){}",
                crate::text::for_message(name),
                crate::text::for_message(&profile.model_id),
                short(&profile.fingerprint),
                crate::text::for_message(&loaded),
                short(&loaded_fingerprint),
                if names.contains(", ") {
                    format!(" and no other model with those weights (it serves: {names})")
                } else {
                    String::new()
                }
            ),
            "kvembed",
        )
        .set_hint(
            "Vectors of different models are not comparable: load the profile's model (kvembed.model or \
             kvembed.models), or create a profile for this one and re-embed.",
        )
        .report(PgLogLevel::ERROR);
        unreachable!()
    };
    let options = EmbedOptions {
        // The engine refuses the request if it restarts with another model
        // before it runs.
        expect_model: Some(loaded),
        model: Some(model_name),
        ..profile.options.clone()
    };
    (options, profile.space.clone())
}

/// Profile `name` as stored, without any check (`kv_status()`).
pub fn stored(name: &str) -> Option<Profile> {
    read_row(name)
}

fn read(name: &str) -> Profile {
    // SAFETY: reads the current statement's start time; no arguments.
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let hit = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|c| c.statement_start == now && c.name == name)
            .map(|c| c.profile.clone())
    });
    if let Some(p) = hit {
        return p;
    }
    let profile = read_row(name).unwrap_or_else(|| {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!(
                "kvembed: no embedding profile named '{}'",
                crate::text::for_message(name)
            ),
            "kvembed",
        )
        .set_hint("SELECT name, model_id FROM kvembed.profiles lists them; kv_create_profile() makes one.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    });
    CACHE.with(|c| {
        *c.borrow_mut() = Some(Cached {
            statement_start: now,
            name: name.to_string(),
            profile: profile.clone(),
        })
    });
    profile
}

fn fail(e: impl std::fmt::Display) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("kvembed: cannot read kvembed.profiles: {e}"),
        "kvembed",
    )
    .report(PgLogLevel::ERROR);
    unreachable!()
}

fn read_row(name: &str) -> Option<Profile> {
    let query = "SELECT model_id, options, space_fit, space_mean, space_directions, space_gains, \
                 fingerprint FROM kvembed.profiles WHERE name = $1";
    let args = [name.into()];
    let floats = |v: Option<Vec<Option<f32>>>| -> Vec<f32> {
        v.unwrap_or_default()
            .into_iter()
            .map(|x| x.unwrap_or(f32::NAN))
            .collect()
    };
    let profile = Spi::connect(|client| {
        let table = client.select(query, Some(1), &args)?;
        if table.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let row = table.first();
        let options = row
            .get::<pgrx::JsonB>(2)?
            .map(|j| j.0)
            .unwrap_or(serde_json::Value::Null);
        let space = match row.get::<String>(3)? {
            None => None,
            Some(fit) => Some(StoredSpace {
                fit,
                options: serde_json::Value::Null,
                map: SpaceMap {
                    mean: floats(row.get(4)?),
                    directions: floats(row.get(5)?),
                    gains: floats(row.get(6)?),
                },
                sample_size: 0,
            }),
        };
        Ok(Some((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(7)?.unwrap_or_default(),
            options,
            space,
        )))
    })
    .unwrap_or_else(|e| fail(e))?;
    let (model_id, fingerprint, options, space) = profile;
    let options: EmbedOptions = serde_json::from_value(options)
        .unwrap_or_else(|e| fail(format!("profile '{name}' has damaged options ({e})")));
    if let Some(s) = &space {
        if let Err(e) = s.map.validate() {
            fail(format!(
                "the space calibration of profile '{name}' is damaged ({e})"
            ));
        }
    }
    Some(Profile {
        model_id,
        fingerprint,
        options,
        space: space.map(Rc::new),
    })
}
