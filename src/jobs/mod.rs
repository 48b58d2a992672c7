//! Background jobs over a whole store.

pub mod reindex;
