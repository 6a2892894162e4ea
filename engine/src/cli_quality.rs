//! The quality study behind docs/QUALITY.md.
use crate::cli::QualityArgs;
use kvembed_engine::Result;

pub fn run(_args: &QualityArgs) -> Result<()> {
    Err(kvembed_engine::EngineError::Other("not yet".into()))
}
