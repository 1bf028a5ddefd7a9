//! Keeping glibc's allocator from holding on to memory the agent no longer uses.
//!
//! glibc malloc raises its mmap threshold each time a large block is freed, so later large
//! buffers (a parsed config, a sled segment, a drain batch) land in the heap instead of their
//! own mappings and pin the pages around them; and the trim threshold, which decides when a
//! free top of the heap goes back to the system, grows along with it. Fixing both at 128 KiB
//! keeps large, short-lived buffers out of the heap and returns freed tops promptly. Measured
//! with the release binary, 1,000 Modbus meters configured and an empty store: 17.8 MiB
//! resident without it, 12.3 MiB with it (`benches/run.sh backbone`).
//! Elsewhere (musl, other systems) this is a no-op. The other large saving, sled's metric
//! histograms, is a build setting: see `[profile.release.package.sled]` in `Cargo.toml`.

/// Fixes the thresholds; call once, first thing in `main`, before other threads exist.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        // One arena per core instead of up to eight: each arena a thread touches keeps its
        // own free memory. Measured when dozens of blocking threads waited in one group
        // commit at a boundary (`benches/run.sh flash`, the peak resident memory column);
        // appends no longer hold a thread while they wait, but the drain's and the other
        // store calls still run on blocking threads.
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
