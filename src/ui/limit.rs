//! Failed sign-ins per peer address: a few a minute, then `429` until the
//! minute is over, so that the admin token cannot be guessed at speed from
//! one address. Bounded in memory: beyond [`MAX_PEERS`] addresses with
//! failures in their minute, the others share one count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

/// Failed sign-ins one address may make in a [`WINDOW_MS`].
pub const MAX_FAILURES: u32 = 5;

/// The window failures are counted in.
pub const WINDOW_MS: i64 = 60_000;

/// Addresses remembered one by one.
pub const MAX_PEERS: usize = 4_096;

/// What the addresses beyond [`MAX_PEERS`] are counted as.
const OVERFLOW: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[derive(Debug, Default)]
pub struct SignInLimit {
    failures: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: i64,
    failures: u32,
}

impl SignInLimit {
    /// Whether `peer` has used up its failed sign-ins for now.
    pub fn exhausted(&self, peer: IpAddr, now: i64) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let counted = |ip: &IpAddr| {
            failures
                .get(ip)
                .is_some_and(|w| now < w.started + WINDOW_MS && w.failures >= MAX_FAILURES)
        };
        counted(&peer) || (!failures.contains_key(&peer) && counted(&OVERFLOW))
    }

    /// Counts a failed sign-in from `peer`.
    pub fn failed(&self, peer: IpAddr, now: i64) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if !failures.contains_key(&peer) && failures.len() >= MAX_PEERS {
            failures.retain(|_, w| now < w.started + WINDOW_MS);
        }
        let peer = if failures.contains_key(&peer) || failures.len() < MAX_PEERS {
            peer
        } else {
            OVERFLOW
        };
        let window = failures.entry(peer).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now >= window.started + WINDOW_MS {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_its_failures_until_the_window_ends() {
        let limit = SignInLimit::default();
        let (peer, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES {
            assert!(!limit.exhausted(peer, 1_000));
            limit.failed(peer, 1_000);
        }
        assert!(limit.exhausted(peer, 1_000));
        assert!(!limit.exhausted(other, 1_000));
        assert!(!limit.exhausted(peer, 1_000 + WINDOW_MS));
    }

    #[test]
    fn beyond_the_remembered_addresses_the_rest_share_one_count() {
        let limit = SignInLimit::default();
        for i in 0..MAX_PEERS as u32 {
            limit.failed(IpAddr::V4(Ipv4Addr::from(i + 1)), 0);
        }
        let late: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            limit.failed(late, 0);
        }
        assert!(limit.exhausted(late, 0));
        assert!(limit.exhausted("192.0.2.2".parse().unwrap(), 0));
    }
}
