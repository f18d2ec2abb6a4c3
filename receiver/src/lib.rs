//! `cis490-receiver`: admits episodes produced by current code over mutual TLS, validates them
//! in one streaming pass and stores them durably with an index.
//!
//! Arrows run down: `cli` -> `server` (accept loop, drain, watchdog) -> `setup` (start-up),
//! `api` (the endpoints) and `ops` (operations listener) -> `gate`, `ingest`, `store` ->
//! `error`, `config`, `metrics`, `auth`, `state`.

pub(crate) mod api;
pub(crate) mod auth;
pub mod cli;
pub mod config;
pub mod decoders;
pub(crate) mod error;
pub(crate) mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod ingest;
pub(crate) mod metrics;
pub(crate) mod ops;
pub mod pki;
pub(crate) mod server;
pub(crate) mod setup;
pub(crate) mod slots;
pub(crate) mod state;
pub(crate) mod store;
pub mod tarwalk;
pub(crate) mod zframes;

pub use config::Config;
pub use server::Receiver;
pub use state::AppState;
