//! Persistence of gist states. [`codec`] is the versioned, checksummed record of one
//! [`crate::state::GistState`]; the sled store that holds records per document (issue 4)
//! builds on it.

pub mod codec;
