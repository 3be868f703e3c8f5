//! Failed tries of the admin token (the sign-in form and `/admin/*`'s
//! `Authorization: Bearer`) per client: after [`FREE_FAILURES`] in a row, each
//! further try from the same client waits before it is judged, twice as long
//! per failure up to [`MAX_WAIT_MS`]. A try is never refused for the
//! failures: once its wait is over, the right token is accepted. So guessing
//! is slowed to a few tries a minute per client, while someone sharing the
//! client's address (everyone behind one SSH tunnel or TLS proxy shares it)
//! can delay the operator by at most [`MAX_WAIT_MS`], not lock them out.
//!
//! A client is its IPv4 address, or its IPv6 address's /64 (one host
//! usually holds a whole /64). Failures are forgotten [`FORGET_MS`] after the
//! last one. Bounded in memory: beyond [`MAX_PEERS`] clients the one whose
//! last failure is oldest is forgotten.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

/// Failed tries a client may make in a row before its tries wait.
pub const FREE_FAILURES: u32 = 5;

/// The first wait, doubled for every further failure.
pub const FIRST_WAIT_MS: i64 = 250;

/// The longest a try waits.
pub const MAX_WAIT_MS: i64 = 4_000;

/// How long after its last failure a client's failures are forgotten.
pub const FORGET_MS: i64 = 60_000;

/// Clients remembered one by one.
pub const MAX_PEERS: usize = 4_096;

#[derive(Debug, Default)]
pub struct SignInLimit {
    clients: Mutex<HashMap<IpAddr, Client>>,
}

#[derive(Debug, Clone, Copy)]
struct Client {
    /// Failures in a row.
    failures: u32,
    /// When the last one was.
    last: i64,
    /// The earliest the next try may be judged: tries that arrive together
    /// are judged one wait apart, not all at once.
    next: i64,
}

impl Client {
    /// How long after the previous try the next waits.
    fn wait(&self) -> i64 {
        match self.failures.checked_sub(FREE_FAILURES) {
            None => 0,
            Some(over) => FIRST_WAIT_MS
                .saturating_mul(1 << over.min(16))
                .min(MAX_WAIT_MS),
        }
    }

    fn forgotten(&self, now: i64) -> bool {
        now >= self.last.saturating_add(FORGET_MS) && now >= self.next
    }
}

/// Who a client is: its IPv4 address (also when mapped into IPv6), or its
/// IPv6 address's /64.
pub fn client(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl SignInLimit {
    /// How many milliseconds a try from `peer` arriving at `now` waits
    /// before it is judged (0 for a client without failures in a row). The
    /// try's turn is taken: the next one waits for it.
    pub fn wait(&self, peer: IpAddr, now: i64) -> i64 {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = clients.get_mut(&client(peer)) else {
            return 0;
        };
        if c.forgotten(now) {
            clients.remove(&client(peer));
            return 0;
        }
        let wait = c.wait();
        let turn = c
            .next
            .max(c.last.saturating_add(wait))
            .clamp(now, now.saturating_add(MAX_WAIT_MS));
        c.next = turn.saturating_add(wait);
        turn - now
    }

    /// Counts a failed try from `peer`, judged at `now`.
    pub fn failed(&self, peer: IpAddr, now: i64) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = client(peer);
        if !clients.contains_key(&key) && clients.len() >= MAX_PEERS {
            clients.retain(|_, c| !c.forgotten(now));
            if clients.len() >= MAX_PEERS {
                let oldest = clients.iter().min_by_key(|(_, c)| c.last).map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    clients.remove(&oldest);
                }
            }
        }
        let c = clients.entry(key).or_insert(Client {
            failures: 0,
            last: now,
            next: now,
        });
        if c.forgotten(now) {
            c.failures = 0;
        }
        c.failures = c.failures.saturating_add(1);
        c.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn fail(limit: &SignInLimit, peer: IpAddr, times: u32, now: i64) {
        for _ in 0..times {
            limit.failed(peer, now);
        }
    }

    #[test]
    fn tries_wait_after_the_free_failures_doubling_up_to_the_cap() {
        let limit = SignInLimit::default();
        let (peer, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert_eq!(limit.wait(peer, 1_000), 0);
            limit.failed(peer, 1_000);
        }
        let mut now = 1_000;
        for expected in [250, 500, 1_000, 2_000, 4_000, 4_000] {
            assert_eq!(limit.wait(peer, now), expected);
            now += expected;
            limit.failed(peer, now);
        }
        assert_eq!(limit.wait(other, now), 0, "another client does not wait");
        let later = now + FORGET_MS + MAX_WAIT_MS;
        assert_eq!(limit.wait(peer, later), 0, "failures are forgotten");
    }

    #[test]
    fn tries_arriving_together_take_turns_but_none_waits_beyond_the_cap() {
        let limit = SignInLimit::default();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        fail(&limit, peer, FREE_FAILURES + 1, 0);
        assert_eq!(limit.wait(peer, 0), 500);
        assert_eq!(limit.wait(peer, 0), 1_000);
        assert_eq!(limit.wait(peer, 0), 1_500);
        for _ in 0..100 {
            assert!(limit.wait(peer, 0) <= MAX_WAIT_MS);
        }
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_address_is_itself() {
        let limit = SignInLimit::default();
        fail(
            &limit,
            "2001:db8:1:2::1".parse().unwrap(),
            FREE_FAILURES + 1,
            0,
        );
        assert!(limit.wait("2001:db8:1:2:ffff::9".parse().unwrap(), 0) > 0);
        assert_eq!(limit.wait("2001:db8:1:3::1".parse().unwrap(), 0), 0);
        fail(&limit, "192.0.2.7".parse().unwrap(), FREE_FAILURES + 1, 0);
        assert!(limit.wait("::ffff:192.0.2.7".parse().unwrap(), 0) > 0);
    }

    #[test]
    fn beyond_the_remembered_clients_the_oldest_is_forgotten_not_pooled() {
        let limit = SignInLimit::default();
        let first: IpAddr = IpAddr::V4(Ipv4Addr::from(1));
        fail(&limit, first, FREE_FAILURES + 1, 0);
        for i in 1..MAX_PEERS as u32 {
            limit.failed(IpAddr::V4(Ipv4Addr::from(i + 1)), 10);
        }
        let late: IpAddr = "192.0.2.1".parse().unwrap();
        fail(&limit, late, FREE_FAILURES + 1, 20);
        assert!(
            limit.wait(late, 20) > 0,
            "the newcomer is counted on its own"
        );
        assert_eq!(limit.wait(first, 20), 0, "the oldest was forgotten");
        let fresh: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limit.wait(fresh, 20), 0, "nobody else shares its count");
    }
}
