//! Protocol pieces both daemons agree on: identifiers, header names, commit parsing, the
//! `meta.json` reader, TLS loading, the systemd notify wrapper, the one durable-write helper,
//! the refusal vocabulary and the exit-code error both command lines use.

pub mod binary;
pub mod cli;
pub mod config_file;
pub mod durable;
pub mod headers;
pub mod ids;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod meta;
pub mod notify;
pub mod reason;
pub mod timefmt;
pub mod tls;

pub use ids::{validate_id, Commit, IdError};
pub use reason::{Disposition, ErrorCode, Reason};

/// Largest zstd window log in a body: the receiver refuses a frame that declares a larger window
/// (2^24 = 16 MiB bounds its decoder memory per upload), so the shipper never declares one.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// `--version` of both binaries: the version and the commit they were built from.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CIS490_BUILD_COMMIT"),
    ")"
);
