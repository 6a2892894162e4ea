//! The parts of `kvembed-lab` that its tests use too: the evaluation data
//! loaders and the tokenizer conformance corpus.

pub mod conformance;
pub mod eval;
