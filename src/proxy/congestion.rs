//! Congestion control on the proxy's loopback legs.
//!
//! Why: a host whose default congestion control paces its sending (BBR, a
//! common choice for fleets) paces loopback connections too, where there is
//! no path to probe and no queue to keep short. Through the proxy every byte
//! crosses two such legs, and the pacing of the second one is pure cost:
//! measured here with BBR as the default, bulk transfers through the proxy
//! reached 0.74× a direct connection, and 0.94-1.04× with the proxy's own
//! loopback leg on cubic (BENCHMARKS.md). So the proxy sets a non-pacing
//! algorithm on the sockets it sends from whose peer is on this host (every
//! client, which reaches the proxy on a loopback address, and backends on
//! loopback addresses); legs to other hosts keep the system default, which
//! the operator chose for real networks.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::LOOPBACK_CONGESTION_SYSTEM as SYSTEM;

/// Where Linux says which algorithm new sockets get.
const SYSTEM_DEFAULT_FILE: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// The algorithm to set on loopback legs, or `None` when there is nothing to
/// do: the operator asked for the system default, or the default already is
/// the configured algorithm (then no socket pays the extra setsockopt).
pub fn resolve(configured: &str) -> Option<CString> {
    if configured == SYSTEM {
        return None;
    }
    let current = system_default().unwrap_or_default();
    if current == configured {
        return None;
    }
    tracing::info!(
        "proxy: loopback legs use congestion control {configured} (the system default is {current})"
    );
    CString::new(configured).ok()
}

/// The algorithm new sockets get on this host.
pub fn system_default() -> io::Result<String> {
    Ok(std::fs::read_to_string(SYSTEM_DEFAULT_FILE)?.trim().to_string())
}

/// The algorithm of the socket `fd`.
pub fn of_socket(fd: RawFd) -> io::Result<String> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `name`, which lives
    // across the call, on a socket the caller holds.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let name = String::from_utf8_lossy(&name[..len as usize]);
    Ok(name.trim_end_matches('\0').to_string())
}

/// Set when a failure was logged, so that thousands of sockets do not each
/// say the same thing.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets `name` on the socket `fd`. A failure (the algorithm is not loaded,
/// or not in net.ipv4.tcp_allowed_congestion_control for this user) keeps
/// the system default and is logged once.
pub fn apply(fd: RawFd, name: &CString) {
    let bytes = name.as_bytes();
    // SAFETY: setsockopt reads `bytes.len()` bytes of a buffer that lives
    // across the call, on a socket the caller holds.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    if result != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        let err = io::Error::last_os_error();
        tracing::warn!(
            "proxy: cannot use congestion control {} on loopback legs ({err}); they keep the system default (load the module or add it to net.ipv4.tcp_allowed_congestion_control, or set proxy.loopback_congestion: system)",
            name.to_string_lossy()
        );
        metrics::counter!("loopmesh_proxy_congestion_control_failures_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn system_means_leave_sockets_alone() {
        assert_eq!(resolve(SYSTEM), None);
    }

    #[test]
    fn apply_sets_the_algorithm_on_the_socket() {
        // reno is built into every Linux kernel and always allowed.
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        apply(socket.as_raw_fd(), &CString::new("reno").unwrap());
        assert_eq!(of_socket(socket.as_raw_fd()).unwrap(), "reno");
    }
}
