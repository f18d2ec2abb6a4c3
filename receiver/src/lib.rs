//! `cis490-receiver`: admits episodes produced by current code over mutual TLS, validates them
//! in one streaming pass and stores them durably with an index.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod gate;
pub mod ingest;
pub mod metrics;
pub mod pki;
pub mod s3;
pub mod server;
pub mod slots;
pub mod store;
pub mod tarwalk;
pub mod zframes;

pub use config::Config;
pub use server::Receiver;
