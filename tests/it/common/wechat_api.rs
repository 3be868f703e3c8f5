//! A fake of WeChat's server API on a real socket: stable tokens for the
//! right AppID and secret only, the Customer Service API's `custom/send` and
//! `custom/typing` checked against the token and recorded, and errors on
//! demand (40001 once, 45015, 48001, …). Every call is logged in order.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

#[derive(Default)]
struct State {
    app_id: String,
    secret: String,
    /// The token stable_token hands out; `None` once WeChat has called it
    /// invalid, so the next fetch gets a new one.
    current: Option<String>,
    issued: usize,
    /// stable_token calls that got a token.
    token_fetches: usize,
    /// What the next custom/send calls answer, one each.
    send_errors: VecDeque<i64>,
    /// What every custom/send answers once the queue is empty.
    always: Option<i64>,
    sent: Vec<Value>,
    typing: Vec<Value>,
    log: Vec<String>,
    /// stable_token answers only once the gate opens.
    token_gate_closed: bool,
}

pub struct FakeWechatApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    gate: Arc<Notify>,
    stop: watch::Sender<bool>,
}

impl FakeWechatApi {
    /// WeChat's API for one AppID and its secret.
    pub async fn start(app_id: &str, secret: &str) -> FakeWechatApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            app_id: app_id.to_owned(),
            secret: secret.to_owned(),
            ..State::default()
        }));
        let gate = Arc::new(Notify::new());
        let (stop, mut stopped) = watch::channel(false);
        let (s, g) = (state.clone(), gate.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    _ = stopped.wait_for(|s| *s) => break,
                };
                let (s, g) = (s.clone(), g.clone());
                let service = service_fn(move |req| answer(s.clone(), g.clone(), req));
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        FakeWechatApi {
            addr,
            state,
            gate,
            stop,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next custom/send answers `errcode` (then as before).
    pub fn fail_send_once(&self, errcode: i64) {
        self.state.lock().unwrap().send_errors.push_back(errcode);
    }

    /// Every custom/send answers `errcode`.
    pub fn fail_sends(&self, errcode: i64) {
        self.state.lock().unwrap().always = Some(errcode);
    }

    /// stable_token holds its answers until [`FakeWechatApi::open_token_gate`].
    pub fn close_token_gate(&self) {
        self.state.lock().unwrap().token_gate_closed = true;
    }

    pub fn open_token_gate(&self) {
        self.state.lock().unwrap().token_gate_closed = false;
        self.gate.notify_waiters();
    }

    pub fn sent(&self) -> Vec<Value> {
        self.state.lock().unwrap().sent.clone()
    }

    pub fn typing(&self) -> Vec<Value> {
        self.state.lock().unwrap().typing.clone()
    }

    pub fn token_fetches(&self) -> usize {
        self.state.lock().unwrap().token_fetches
    }

    /// Every call, in order: `POST /cgi-bin/… -> what it answered`; the
    /// token service is `GET /token-service`.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for FakeWechatApi {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.gate.notify_waiters();
    }
}

async fn answer(
    state: Arc<Mutex<State>>,
    gate: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = parts.uri.path().to_owned();
    let token = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("access_token=")))
        .unwrap_or("")
        .to_owned();
    if path == "/cgi-bin/stable_token" {
        loop {
            let opened = gate.notified();
            if !state.lock().unwrap().token_gate_closed {
                break;
            }
            opened.await;
        }
    }
    let mut s = state.lock().unwrap();
    let answer = match path.as_str() {
        "/cgi-bin/stable_token" => stable_token(&mut s, &body),
        // A team's central token service, in front of stable_token.
        "/token-service" => {
            let (app_id, secret) = (s.app_id.clone(), s.secret.clone());
            let grant = json!({"grant_type": "client_credential", "appid": app_id,
                "secret": secret, "force_refresh": false});
            stable_token(&mut s, &grant)
        }
        "/cgi-bin/message/custom/send" => custom_send(&mut s, &token, body),
        "/cgi-bin/message/custom/typing" => match valid(&s, &token) {
            Some(refused) => refused,
            None => {
                s.typing.push(body);
                ok()
            }
        },
        _ => json!({"errcode": 404, "errmsg": "no such API"}),
    };
    let summary = match answer.get("access_token") {
        Some(_) => format!("token #{}", s.issued),
        None => format!("errcode {}", answer["errcode"]),
    };
    s.log.push(format!("{} {path} -> {summary}", parts.method));
    Ok(Response::new(Full::new(Bytes::from(answer.to_string()))))
}

fn ok() -> Value {
    json!({"errcode": 0, "errmsg": "ok"})
}

fn stable_token(s: &mut State, body: &Value) -> Value {
    let right = body["grant_type"] == "client_credential"
        && body["appid"] == s.app_id.as_str()
        && body["secret"] == s.secret.as_str()
        && body["force_refresh"] == false;
    if !right {
        return json!({"errcode": 40125, "errmsg": "invalid appsecret"});
    }
    s.token_fetches += 1;
    let token = match &s.current {
        Some(token) => token.clone(),
        None => {
            s.issued += 1;
            let token = format!("STABLE_TOKEN_{}", s.issued);
            s.current = Some(token.clone());
            token
        }
    };
    json!({"access_token": token, "expires_in": 7200})
}

/// 40001 for a token it did not issue or has dropped.
fn valid(s: &State, token: &str) -> Option<Value> {
    (s.current.as_deref() != Some(token))
        .then(|| json!({"errcode": 40001, "errmsg": "invalid credential"}))
}

fn custom_send(s: &mut State, token: &str, body: Value) -> Value {
    if let Some(refused) = valid(s, token) {
        return refused;
    }
    match s.send_errors.pop_front().or(s.always) {
        Some(40001) => {
            // WeChat no longer takes the token: the next fetch gets another.
            s.current = None;
            json!({"errcode": 40001, "errmsg": "invalid credential"})
        }
        Some(errcode) => json!({"errcode": errcode, "errmsg": format!("refused with {errcode}")}),
        None => {
            s.sent.push(body);
            ok()
        }
    }
}
