//! Text to model input: sentences ([`segment`]), tokens that never cross a sentence
//! ([`tokenize`]), chat templates ([`chat`]).

pub mod chat;
pub mod encoder;
pub mod files;
pub mod segment;
pub mod tokenize;
