//! `cis490-shipper`: packs finished episodes as canonical tar+zstd and ships them over mTLS.

pub mod cli;
pub mod config;
pub(crate) mod daemon;
pub mod doctor;
pub(crate) mod host;
pub(crate) mod metrics;
pub mod pack;
pub(crate) mod queue;
pub(crate) mod retry;
pub mod transport;
