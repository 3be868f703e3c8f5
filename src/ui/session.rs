//! Signing in to the pages: a session cookie and the CSRF token tied to it.
//!
//! The cookie holds no state of the relay's: its expiry and a random nonce,
//! MACed (HMAC-SHA256) with a key derived from the admin token. Every
//! replica sharing the token accepts it, a restart keeps it valid, and a new
//! token signs everyone out. Without an admin token (the admin listener left
//! open) the key is random per process: the cookie then only carries the
//! CSRF token. The CSRF token is the MAC of the nonce under the same key, so
//! a form is accepted only with the session it was rendered for. Every
//! comparison is of two SHA-256 digests, in constant time: neither the
//! secret's content nor its length shows in how long it takes.
//!
//! Signing out ends the session on this process: its nonce is kept in a
//! bounded set until the cookie would have expired ([`SignedOut`]). Another
//! replica does not know of it and accepts the cookie until it expires;
//! changing the admin token signs every session out everywhere.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use subtle::ConstantTimeEq;

/// The cookie's name.
pub const COOKIE: &str = "wxrelay_ui";

/// How long a session lasts: a working day.
pub const LIFETIME_MS: i64 = 12 * 3_600 * 1_000;

/// What MACs the cookie and the CSRF tokens.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// The key derived from the admin token: the same on every replica.
    pub fn from_token(token: &str) -> Self {
        SessionKey(mac(token.as_bytes(), b"wxrelay ui session key v1"))
    }

    /// A key of this process only, for an admin listener without a token.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        SessionKey(key)
    }

    fn sign(&self, purpose: &str, text: &str) -> String {
        hex::encode(mac(&self.0, format!("{purpose}:{text}").as_bytes()))
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(***)")
    }
}

fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length: new_from_slice cannot fail.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
        return [0; 32];
    };
    m.update(message);
    m.finalize().into_bytes().into()
}

/// Whether two secrets are equal. Their SHA-256 digests are compared in
/// constant time: the time taken depends on neither secret's content nor
/// its length (only hashing `given` depends on its own length).
pub fn same(given: &str, expected: &str) -> bool {
    let (given, expected) = (Sha256::digest(given), Sha256::digest(expected));
    bool::from(given.ct_eq(&expected))
}

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Unix milliseconds after which the cookie is refused.
    pub expires_at: i64,
    nonce: String,
}

impl Session {
    /// A new session from `now` (unix milliseconds).
    pub fn issue(now: i64) -> Self {
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        Session {
            expires_at: now.saturating_add(LIFETIME_MS),
            nonce: hex::encode(nonce),
        }
    }

    /// The session a request's `Cookie` header carries, when its MAC holds
    /// and it has not expired.
    pub fn from_cookies(key: &SessionKey, header: &str, now: i64) -> Option<Self> {
        let value = header
            .split(';')
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value)?;
        let (signed, given) = value.rsplit_once('.')?;
        if !same(given, &key.sign("session", signed)) {
            return None;
        }
        let (expires_at, nonce) = signed.split_once('.')?;
        let expires_at: i64 = expires_at.parse().ok()?;
        (now < expires_at).then(|| Session {
            expires_at,
            nonce: nonce.to_owned(),
        })
    }

    /// The `Set-Cookie` value that keeps this session in the browser.
    pub fn set_cookie(&self, key: &SessionKey, secure: bool) -> String {
        let signed = format!("{}.{}", self.expires_at, self.nonce);
        let mac = key.sign("session", &signed);
        let max_age = LIFETIME_MS / 1000;
        let secure = if secure { "; Secure" } else { "" };
        format!(
            "{COOKIE}={signed}.{mac}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
        )
    }

    /// The `Set-Cookie` value that signs the browser out.
    pub fn clear_cookie(secure: bool) -> String {
        let secure = if secure { "; Secure" } else { "" };
        format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict{secure}")
    }

    /// When the session was issued: its expiry less its lifetime.
    fn issued_at(&self) -> i64 {
        self.expires_at.saturating_sub(LIFETIME_MS)
    }

    /// The CSRF token every form of this session carries.
    pub fn csrf(&self, key: &SessionKey) -> String {
        key.sign("csrf", &self.nonce)
    }

    /// Whether `given` is this session's CSRF token.
    pub fn csrf_holds(&self, key: &SessionKey, given: &str) -> bool {
        same(given, &self.csrf(key))
    }
}

/// The sessions signed out on this process, until their cookies would have
/// expired. Bounded: when it is full of live sessions, every session issued
/// until then is refused instead (everyone signs in again), which keeps the
/// promise that a signed-out cookie opens nothing.
#[derive(Debug, Default)]
pub struct SignedOut {
    state: Mutex<Revoked>,
}

#[derive(Debug, Default)]
struct Revoked {
    /// Nonce → when its cookie expires.
    nonces: HashMap<String, i64>,
    /// Sessions issued before this (unix milliseconds) are refused.
    not_before: i64,
}

/// How many signed-out sessions are remembered one by one.
pub const MAX_SIGNED_OUT: usize = 4_096;

impl SignedOut {
    /// Ends `session` on this process.
    pub fn sign_out(&self, session: &Session, now: i64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.nonces.len() >= MAX_SIGNED_OUT {
            state.nonces.retain(|_, expires_at| *expires_at > now);
        }
        if state.nonces.len() >= MAX_SIGNED_OUT {
            state.nonces.clear();
            state.not_before = now.saturating_add(1);
            return;
        }
        state
            .nonces
            .insert(session.nonce.clone(), session.expires_at);
    }

    /// Whether `session` was signed out here.
    pub fn ended(&self, session: &Session) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        session.issued_at() < state.not_before || state.nonces.contains_key(&session.nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_owned()
    }

    #[test]
    fn a_session_comes_back_from_its_cookie_until_it_expires() {
        let key = SessionKey::from_token("a-long-admin-token");
        let session = Session::issue(1_000);
        let cookie = cookie_pair(&session.set_cookie(&key, false));
        let header = format!("other=1; {cookie}");
        assert_eq!(Session::from_cookies(&key, &header, 2_000), Some(session));
        assert_eq!(
            Session::from_cookies(&key, &header, 1_000 + LIFETIME_MS),
            None
        );
    }

    #[test]
    fn a_cookie_under_another_key_or_altered_is_refused() {
        let key = SessionKey::from_token("a-long-admin-token");
        let session = Session::issue(1_000);
        let cookie = cookie_pair(&session.set_cookie(&key, false));
        let other = SessionKey::from_token("another-admin-token");
        assert_eq!(Session::from_cookies(&other, &cookie, 2_000), None);
        // A later expiry with the old MAC.
        let (_, rest) = cookie.split_once('=').unwrap();
        let (_, tail) = rest.split_once('.').unwrap();
        let forged = format!("{COOKIE}=99999999999999.{tail}");
        assert_eq!(Session::from_cookies(&key, &forged, 2_000), None);
        assert_eq!(Session::from_cookies(&key, "", 2_000), None);
    }

    #[test]
    fn the_csrf_token_belongs_to_its_session() {
        let key = SessionKey::from_token("a-long-admin-token");
        let (a, b) = (Session::issue(0), Session::issue(0));
        assert!(a.csrf_holds(&key, &a.csrf(&key)));
        assert!(!a.csrf_holds(&key, &b.csrf(&key)));
        assert!(!a.csrf_holds(&key, ""));
    }

    #[test]
    fn a_signed_out_session_stays_ended_and_a_full_set_ends_every_older_one() {
        let signed_out = SignedOut::default();
        let (a, b) = (Session::issue(0), Session::issue(0));
        signed_out.sign_out(&a, 10);
        assert!(signed_out.ended(&a));
        assert!(!signed_out.ended(&b));
        for _ in 0..MAX_SIGNED_OUT {
            signed_out.sign_out(&Session::issue(20), 30);
        }
        // Full of live sessions: every one issued so far is refused, a new one is not.
        assert!(signed_out.ended(&a) && signed_out.ended(&b));
        assert!(!signed_out.ended(&Session::issue(40)));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_when_asked() {
        let key = SessionKey::random();
        let set = Session::issue(0).set_cookie(&key, true);
        for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/ui"] {
            assert!(set.contains(flag), "{set}");
        }
        assert!(!Session::issue(0).set_cookie(&key, false).contains("Secure"));
    }
}
