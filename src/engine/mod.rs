//! The gist paths that run documents through the model: sentence by sentence against a
//! stored state ([`state`], one cache per document; [`slots`], the batch's caches in one
//! tensor), whole documents at once ([`whole`]), and [`compress`], which drives whole
//! documents through the incremental engines.

pub mod compress;
pub mod slots;
pub mod state;
pub mod whole;
