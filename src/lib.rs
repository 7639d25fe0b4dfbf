//! moss: a self-hostable web chat service in front of one language model.

pub mod admin;
pub mod admission;
pub mod answer;
pub mod app;
pub mod autoadmit;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod engine;
pub mod http;
pub mod limits;
pub mod mail;
pub mod metrics;
pub mod models;
pub mod passwords;
pub mod policy;
pub mod recovery;
pub mod render;
pub mod secrets;
pub mod shares;
pub mod tally;
pub mod upstream;
