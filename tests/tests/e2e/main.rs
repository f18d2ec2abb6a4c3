//! End-to-end tests: real mTLS, real git repositories, real processes. One binary, many modules.

mod compression;
mod crash;
mod differential;
mod fleet_view;
mod gate;
mod hardening;
mod hostile;
mod pki_cmd;
mod power_cut;
mod receiver_api;
mod receiver_limits;
mod receiver_process;
mod receiver_tls;
mod resume;
mod roundtrip;
mod rules;
mod s3;
mod s3_resume;
mod s3_scrub;
mod scripts;
mod shipper;
mod shipper_metrics;
mod shipper_process;
mod store_truth;
mod support;
