//! Signing in to the pages: a session cookie and the CSRF token tied to it.
//!
//! The cookie holds no state of the relay's: its expiry and a random nonce,
//! MACed (HMAC-SHA256) with a key derived from the admin token. Every
//! replica sharing the token accepts it, a restart keeps it valid, and a new
//! token signs everyone out. Without an admin token (the admin listener left
//! open) the key is random per process: the cookie then only carries the
//! CSRF token. The CSRF token is the MAC of the nonce under the same key, so
//! a form is accepted only with the session it was rendered for. Every
//! comparison is in constant time.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
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

/// Whether two secrets are equal, in time that depends only on their lengths.
pub fn same(given: &str, expected: &str) -> bool {
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
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

    /// The CSRF token every form of this session carries.
    pub fn csrf(&self, key: &SessionKey) -> String {
        key.sign("csrf", &self.nonce)
    }

    /// Whether `given` is this session's CSRF token.
    pub fn csrf_holds(&self, key: &SessionKey, given: &str) -> bool {
        same(given, &self.csrf(key))
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
    fn the_cookie_is_http_only_strict_and_secure_when_asked() {
        let key = SessionKey::random();
        let set = Session::issue(0).set_cookie(&key, true);
        for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/ui"] {
            assert!(set.contains(flag), "{set}");
        }
        assert!(!Session::issue(0).set_cookie(&key, false).contains("Secure"));
    }
}
