//! Loopback address pool: where each service's address comes from.
//!
//! Every node must pick the same address for a service, and that address
//! must never collide with the loopback addresses the OS already uses
//! (127.0.0.1, systemd-resolved's 127.0.0.53, Debian's 127.0.1.1). The pool
//! therefore lives inside 127.0.0.0/8 but outside 127.0.0.0/16, and the first
//! candidate for a service is a stable hash of its name, so racing agents
//! usually agree even before the store's transaction settles it.

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// A pool or pinned address that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AddressError {
    #[error("invalid address pool {0:?}: expected a CIDR like 127.100.0.0/16")]
    PoolSyntax(String),
    #[error("address pool {0} must lie inside 127.0.0.0/8 and outside 127.0.0.0/16 (used by the OS)")]
    PoolRange(String),
    #[error("address pool {0} is exhausted: every address is taken")]
    Exhausted(String),
    #[error("invalid service address {0:?}: expected an IPv4 address like 127.100.0.7")]
    Syntax(String),
    #[error("service address {0} must lie inside 127.0.0.0/8 and outside 127.0.0.0/16")]
    Range(Ipv4Addr),
}

/// A CIDR block of loopback addresses handed out to services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPool {
    base: u32,
    prefix_len: u8,
}

impl AddressPool {
    /// Parses `127.100.0.0/16` and checks it avoids the OS's loopback block.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let syntax = || AddressError::PoolSyntax(text.to_string());
        let (addr, len) = text.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix_len: u8 = len.parse().map_err(|_| syntax())?;
        if !(8..=30).contains(&prefix_len) {
            return Err(syntax());
        }
        let mask = u32::MAX << (32 - prefix_len);
        let base = u32::from(addr) & mask;
        let pool = AddressPool { base, prefix_len };
        let first = Ipv4Addr::from(base);
        let last = Ipv4Addr::from(base | !mask);
        if prefix_len < 16 || check_service_address(first).is_err() || check_service_address(last).is_err() {
            return Err(AddressError::PoolRange(text.to_string()));
        }
        Ok(pool)
    }

    /// Number of addresses in the pool.
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix_len)
    }

    /// Whether `addr` lies in the pool.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr).wrapping_sub(self.base) < self.size()
    }

    /// The address `service` should get, given the addresses already taken.
    ///
    /// Starts at a stable hash of the name and probes forward, skipping the
    /// pool's first and last address (network and broadcast by habit).
    pub fn pick(&self, service: &str, taken: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, AddressError> {
        let usable = self.size() - 2;
        let start = fnv1a(service.as_bytes()) % usable;
        (0..usable)
            .map(|step| Ipv4Addr::from(self.base + 1 + (start + step) % usable))
            .find(|candidate| !taken.contains(candidate))
            .ok_or_else(|| AddressError::Exhausted(self.to_string()))
    }
}

impl std::fmt::Display for AddressPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix_len)
    }
}

/// Checks an address a service may be served on (allocated or pinned).
pub fn check_service_address(addr: Ipv4Addr) -> Result<Ipv4Addr, AddressError> {
    let [a, b, _, _] = addr.octets();
    if a != 127 || b == 0 {
        return Err(AddressError::Range(addr));
    }
    Ok(addr)
}

/// Parses an address value as stored under `addresses/<service>`.
pub fn parse_service_address(text: &str) -> Result<Ipv4Addr, AddressError> {
    let trimmed = text.trim().trim_matches(|c| c == '"' || c == '\'');
    let addr: Ipv4Addr = trimmed
        .parse()
        .map_err(|_| AddressError::Syntax(text.trim().to_string()))?;
    check_service_address(addr)
}

/// FNV-1a: a stable, documented hash, so every build picks the same address.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_must_avoid_os_loopback() {
        assert!(AddressPool::parse("127.100.0.0/16").is_ok());
        assert!(AddressPool::parse("127.0.0.0/16").is_err());
        assert!(AddressPool::parse("127.0.0.0/8").is_err());
        assert!(AddressPool::parse("10.0.0.0/16").is_err());
        assert!(AddressPool::parse("127.100.0.0").is_err());
    }

    #[test]
    fn pick_is_stable_and_skips_taken() {
        let pool = AddressPool::parse("127.100.0.0/24").unwrap();
        let first = pool.pick("postgres", &HashSet::new()).unwrap();
        assert_eq!(first, pool.pick("postgres", &HashSet::new()).unwrap());
        assert!(pool.contains(first));
        let taken = HashSet::from([first]);
        let second = pool.pick("postgres", &taken).unwrap();
        assert_ne!(first, second);
        assert!(pool.contains(second));
    }

    #[test]
    fn exhausted_pool_is_an_error() {
        let pool = AddressPool::parse("127.100.0.0/30").unwrap();
        let taken: HashSet<_> = ["127.100.0.1", "127.100.0.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert!(matches!(pool.pick("x", &taken), Err(AddressError::Exhausted(_))));
    }

    #[test]
    fn service_address_values() {
        assert_eq!(
            parse_service_address("127.100.0.7\n"),
            Ok(Ipv4Addr::new(127, 100, 0, 7))
        );
        assert_eq!(
            parse_service_address("\"127.100.0.7\""),
            Ok(Ipv4Addr::new(127, 100, 0, 7))
        );
        assert!(parse_service_address("127.0.0.1").is_err());
        assert!(parse_service_address("10.0.0.1").is_err());
        assert!(parse_service_address("nope").is_err());
    }
}
