//! `cis490-shipper`: packs finished episodes as canonical tar+zstd and ships them over mTLS.

pub mod pack;
