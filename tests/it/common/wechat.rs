//! WeChat as several relay replicas behind a load balancer see it: each push
//! goes to the next replica in turn, and a push that is not answered 200
//! within 5 s (a refused connection, a reset, a 503, no answer) is sent again
//! to the next one, three tries in all.

use super::try_send;
use bytes::Bytes;
use http::Method;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long WeChat waits for an answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// Tries per push: the first and two re-sends, about 15 s in all.
pub const TRIES: usize = 3;

pub struct WeChat {
    replicas: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// What became of one push.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Answered 200 at the last try.
    pub answered: bool,
    /// Each try's status, `refused` for a connection refused, or `-` for no
    /// answer (the relay may have stored the push before it went away).
    pub statuses: Vec<String>,
}

impl WeChat {
    pub fn new(replicas: Vec<SocketAddr>) -> WeChat {
        WeChat {
            replicas,
            next: AtomicUsize::new(0),
        }
    }

    /// Sends `path` with `body` until a replica answers 200 or the tries run out.
    pub async fn push(&self, path: &str, body: &[u8]) -> Sent {
        let mut statuses = Vec::new();
        for _ in 0..TRIES {
            let at = self.replicas[self.next.fetch_add(1, Ordering::Relaxed) % self.replicas.len()];
            let request = try_send(at, Method::POST, path, Bytes::copy_from_slice(body));
            match tokio::time::timeout(DEADLINE, request).await {
                Ok(Ok(answer)) if answer.status == 200 => {
                    statuses.push("200".to_owned());
                    return Sent {
                        answered: true,
                        statuses,
                    };
                }
                Ok(Ok(answer)) => statuses.push(answer.status.as_str().to_owned()),
                // Refused: the push never reached a relay.
                Ok(Err(e)) if e.contains("refused") => statuses.push("refused".to_owned()),
                Ok(Err(_)) | Err(_) => statuses.push("-".to_owned()),
            }
        }
        Sent {
            answered: false,
            statuses,
        }
    }
}

/// The `nonce` of a signed query: what tells one push from another downstream,
/// in the query a `raw` or `plain` target receives as in the one WeChat sent.
pub fn nonce_of(query: &str) -> String {
    let query = query.split_once('?').map_or(query, |(_, q)| q);
    query
        .split('&')
        .find_map(|p| p.strip_prefix("nonce="))
        .unwrap()
        .to_string()
}
