//! Giving freed heap back to the OS.
//!
//! Building a catalog snapshot or a zone allocates far more transiently than
//! it keeps (parsed values, intermediate maps). glibc keeps freed pages in
//! its arenas, so without a trim the resident size stays at the peak for
//! good; operators read RSS as the agent's footprint.

/// Hands free heap pages back to the OS (glibc only; a no-op elsewhere).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}
