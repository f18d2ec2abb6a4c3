//! Support for the end-to-end tests: a throwaway PKI (rcgen), real git repositories, episodes,
//! an mTLS HTTP client, and receivers run in-process or as child processes.

pub mod client;
pub mod episode;
pub mod faultfs;
pub mod fleet;
pub mod forgejo;
pub mod garage;
pub mod git;
pub mod harness;
pub mod pki;
pub mod rawtar;
pub mod relay;
