//! `cis490-shipper`: packs finished episodes as canonical tar+zstd and ships them over mTLS.

pub(crate) mod adapt;
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

/// Bytes for the unit tests.
#[cfg(test)]
pub(crate) mod test_bytes {
    /// Incompressible bytes that do not repeat within a chunk, so a tarball's size follows its
    /// file's and an off-by-one in a byte range shows.
    pub(crate) fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}
