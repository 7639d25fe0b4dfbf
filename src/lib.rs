//! moss: a self-hostable web chat service in front of one language model.

pub mod cli;
pub mod config;
pub mod engine;
pub mod models;
