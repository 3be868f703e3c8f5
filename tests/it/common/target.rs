//! A fake target on a real socket: answers as scripted and records every
//! request it received, for the tests to compare with what WeChat sent.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::body::{Body, Frame};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// How the target answers one request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Never answers (until it is told to release).
    Hang,
    /// Answers with this status once told to release.
    Hold(u16),
    /// Sends this status and its headers at once, then a body that never
    /// ends (until told to release): a target that stalls mid-answer.
    StallBody(u16),
    /// Answers as the inner behaviour after a delay: a slow broker.
    After(Duration, Box<Behaviour>),
    /// Answers as the inner behaviour once told to release: a broker that
    /// thinks for as long as the test wants.
    Gated(Box<Behaviour>),
}

impl Behaviour {
    pub fn status(status: u16) -> Self {
        Behaviour::Answer {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    pub fn body(status: u16, content_type: &str, body: &str) -> Self {
        Behaviour::Answer {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: body.to_string(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Received {
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn query(&self) -> &str {
        self.uri.split_once('?').map(|(_, q)| q).unwrap_or("")
    }
}

/// Picks the answer to a request from what it carries; `None` leaves it to
/// the script and the default.
pub type Responder = Box<dyn FnMut(&Received) -> Option<Behaviour> + Send>;

struct State {
    script: VecDeque<Behaviour>,
    default: Behaviour,
    responder: Option<Responder>,
    received: Vec<Received>,
}

pub struct FakeTarget {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    release: Arc<Notify>,
    stop: watch::Sender<bool>,
}

impl FakeTarget {
    /// A target answering 200 on a fresh port.
    pub async fn start() -> FakeTarget {
        Self::start_at(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// A target on a port chosen earlier (a target that "comes back").
    pub async fn start_on(addr: SocketAddr) -> FakeTarget {
        let mut tries = 0;
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return Self::start_at(l),
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        }
    }

    fn start_at(listener: TcpListener) -> FakeTarget {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            script: VecDeque::new(),
            default: Behaviour::status(200),
            responder: None,
            received: Vec::new(),
        }));
        let (stop, mut stopped) = watch::channel(false);
        let arrived = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (s, a, r) = (state.clone(), arrived.clone(), release.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    _ = stopped.wait_for(|s| *s) => break,
                };
                let (s, a, r) = (s.clone(), a.clone(), r.clone());
                let service = service_fn(move |req| answer(s.clone(), a.clone(), r.clone(), req));
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        FakeTarget {
            addr,
            state,
            arrived,
            release,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next requests with `script`, then as the default.
    pub fn script(&self, script: impl IntoIterator<Item = Behaviour>) {
        self.state.lock().unwrap().script.extend(script);
    }

    pub fn set_default(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().default = behaviour;
    }

    /// Answers each request as `responder` says, before the script and the default.
    pub fn respond_with(
        &self,
        responder: impl FnMut(&Received) -> Option<Behaviour> + Send + 'static,
    ) {
        self.state.lock().unwrap().responder = Some(Box::new(responder));
    }

    /// Lets every hanging request end (with a 503) and every held one answer.
    pub fn release_hung(&self) {
        self.release.notify_waiters();
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.arrived.notified();
            if self.count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() >= n;
            }
        }
    }

    /// Stops listening (open connections are left to end).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        self.stop();
        self.release_hung();
    }
}

/// What the fake target answers with: a whole body, or one that stalls.
type Answered = Response<Either<Full<Bytes>, Stalled>>;

/// A body that yields nothing until the target is told to release.
struct Stalled(Pin<Box<dyn Future<Output = ()> + Send + Sync>>);

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.as_mut().poll(cx).map(|()| None)
    }
}

async fn answer(
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    release: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Answered, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let behaviour = {
        let mut s = state.lock().unwrap();
        let received = Received {
            uri: parts.uri.to_string(),
            headers: parts.headers,
            body,
        };
        let chosen = s.responder.as_mut().and_then(|r| r(&received));
        s.received.push(received);
        match chosen {
            Some(behaviour) => behaviour,
            None => {
                let next = s.script.pop_front();
                next.unwrap_or_else(|| s.default.clone())
            }
        }
    };
    arrived.notify_waiters();
    let mut behaviour = behaviour;
    loop {
        match behaviour {
            Behaviour::After(delay, then) => {
                tokio::time::sleep(delay).await;
                behaviour = *then;
            }
            Behaviour::Gated(then) => {
                release.notified().await;
                behaviour = *then;
            }
            other => {
                behaviour = other;
                break;
            }
        }
    }
    let whole = |status, headers: &[(&'static str, String)], body: &str| {
        respond(
            status,
            headers,
            Either::Left(Full::new(Bytes::from(body.to_owned()))),
        )
    };
    match behaviour {
        Behaviour::After(..) | Behaviour::Gated(..) => unreachable!("unwrapped above"),
        Behaviour::Hang => {
            release.notified().await;
            Ok(whole(503, &[], ""))
        }
        Behaviour::Hold(status) => {
            release.notified().await;
            Ok(whole(status, &[], ""))
        }
        Behaviour::StallBody(status) => {
            let released = Box::pin(async move { release.notified().await });
            Ok(respond(status, &[], Either::Right(Stalled(released))))
        }
        Behaviour::Answer {
            status,
            headers,
            body,
        } => Ok(whole(status, &headers, &body)),
    }
}

fn respond(
    status: u16,
    headers: &[(&'static str, String)],
    body: Either<Full<Bytes>, Stalled>,
) -> Answered {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().insert(*name, value.parse().unwrap());
    }
    response
}
