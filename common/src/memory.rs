//! Process-wide allocator tuning for the daemons.

/// Caps glibc's malloc arenas at two. glibc gives busy threads their own arena (up to 8 per
/// core), and each keeps freed memory for reuse, so a daemon whose packing, hashing, TLS and
/// zstd work hops between tokio and blocking-pool threads ends up holding several copies of its
/// working set. Measured (docs/BENCHMARKS.md): the shipper's peak RSS on the large workload
/// went from 56 to 26.5 MiB. Must run before the first thread is spawned; without glibc it does
/// nothing.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // An explicit MALLOC_ARENA_MAX from the environment wins: operators can still tune it.
        // So does `GLIBC_TUNABLES=glibc.malloc.arena_max=N`.
        let tuned =
            std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.arena_max"));
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() && !tuned {
            // SAFETY: mallopt only changes allocator parameters; it is called from main before
            // any other thread exists, and a refused value (return 0) leaves glibc's default.
            unsafe {
                nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
            }
        }
    }
}

/// Returns memory freed by a burst of work (a start-up scan, say) to the system; glibc keeps it
/// otherwise. Without glibc it does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is thread-safe in glibc.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
