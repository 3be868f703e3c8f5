//! Shared test harness: the real relay on 127.0.0.1:0 with a real SQLite spool
//! (or PostgreSQL, in a schema of its own on the test database)
//! in a temp dir and an injected clock, a minimal HTTP client, and the vectors.

pub mod database;
pub mod disk;
pub mod logs;
pub mod proxy;
pub mod replicas;
pub mod target;
pub mod wechat;
pub mod wechat_api;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use wxrelay::app::{Options, Relay};
use wxrelay::clock::FixedClock;
use wxrelay::config::Settings;
use wxrelay::spool::postgres::{self, testing::TestSchema};
use wxrelay::spool::{DeadFilter, DeadReason, OpenSpool, Operator, PostgresSpool, SqliteSpool};

pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

// ---- the generated vectors ----

pub fn generated() -> Value {
    fixture("generated-vectors.json")
}

pub fn reference_now(g: &Value) -> i64 {
    g["config"]["reference_now"].as_i64().unwrap()
}

/// The generated vectors' credentials on four accounts: one per mode, and a
/// secure one that also holds the previous key.
pub fn generated_config(g: &Value) -> String {
    let c = &g["config"];
    let account = |id: &str, mode: &str, previous: bool| {
        let mut s = format!(
            "[accounts.{id}]\napp_id = {}\ntoken = {}\nencoding_aes_key = {}\nmode = \"{mode}\"\ntimestamp_window = \"300s\"\n",
            c["appid"], c["token"], c["encoding_aes_key"]
        );
        if previous {
            s += &format!(
                "previous_encoding_aes_key = {}\n",
                c["previous_encoding_aes_key"]
            );
        }
        s
    };
    [
        account("plaintext", "plaintext", false),
        account("compat", "compat", false),
        account("secure", "secure", false),
        account("rotating", "secure", true),
    ]
    .join("\n")
}

/// A vector's `expected.fields` in the relay's shape: the generator's parser
/// makes a single `item` or `List` entry an object, the relay always makes
/// list entries an array.
pub fn expected_fields(expected: &Value) -> Value {
    fn lists_as_arrays(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(name, child)| {
                        let child = lists_as_arrays(child);
                        let list = matches!(name.as_str(), "item" | "List") && !child.is_array();
                        let child = if list {
                            Value::Array(vec![child])
                        } else {
                            child
                        };
                        (name.clone(), child)
                    })
                    .collect(),
            ),
            Value::Array(values) => Value::Array(values.iter().map(lists_as_arrays).collect()),
            other => other.clone(),
        }
    }
    lists_as_arrays(&expected["fields"])
}

pub fn path(account: &str, request: &Value) -> String {
    format!(
        "/wx/{account}?{}",
        request["query_string"].as_str().unwrap()
    )
}

pub fn body(request: &Value) -> Vec<u8> {
    if let Some(g) = request.get("body_generator").filter(|g| !g.is_null()) {
        let mut b = g["prefix"].as_str().unwrap().to_string();
        b += &g["repeat"]
            .as_str()
            .unwrap()
            .repeat(g["count"].as_u64().unwrap() as usize);
        b += g["suffix"].as_str().unwrap();
        return b.into_bytes();
    }
    request["body"].as_str().unwrap_or("").as_bytes().to_vec()
}

/// A positive or special vector by id.
pub fn vector<'g>(g: &'g Value, id: &str) -> &'g Value {
    ["positive", "special"]
        .iter()
        .flat_map(|group| g[group].as_array().unwrap())
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no vector {id}"))
}

/// A `[targets.NAME]` section with a short timeout and `extra` keys.
pub fn target(name: &str, url: &str, extra: &str) -> String {
    format!("[targets.{name}]\nurl = \"{url}\"\ntimeout = \"2s\"\n{extra}\n")
}

/// The vectors' accounts, the given targets and routes, a short reply budget.
pub fn config(g: &Value, targets: &[String], routes: &str) -> String {
    format!(
        "[server]\nreply_budget = \"1s\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{}\n{}\n{routes}",
        generated_config(g),
        targets.concat()
    )
}

/// One target, `hooks` at `url` with `extra` keys, that every push goes to.
pub fn hooks_config(g: &Value, url: &str, extra: &str) -> String {
    config(
        g,
        &[target("hooks", url, extra)],
        "[[routes]]\nto = [\"hooks\"]\n",
    )
}

/// Login events to the broker, which may answer WeChat.
pub fn broker_routes() -> &'static str {
    "[[routes]]\nmatch = { event = [\"subscribe\", \"SCAN\"] }\nto = [\"broker\"]\nreply_from = \"broker\"\n"
}

pub struct TestRelay {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The spool as the operator's commands see it.
    pub spool: Arc<dyn Operator>,
    /// The SQLite spool's file (unused on PostgreSQL).
    pub spool_path: PathBuf,
    pub clock: Arc<FixedClock>,
    pub dir: tempfile::TempDir,
    pub opened: OpenSpool,
    /// The PostgreSQL spool's schema, dropped with the relay.
    pub schema: Option<TestSchema>,
    /// How often the delivery workers look in the spool unprompted.
    idle_poll: Option<Duration>,
}

impl TestRelay {
    /// Starts the relay on `toml` (the spool path is replaced by a temp file).
    pub async fn start(toml: &str, now_secs: i64) -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        let spool_path = dir.path().join("spool.db");
        Self::start_in(toml, now_secs, dir, &spool_path).await
    }

    /// As [`TestRelay::start`], with the spool file at `spool_path`.
    pub async fn start_with_spool_at(toml: &str, now_secs: i64, spool_path: &Path) -> TestRelay {
        Self::start_in(toml, now_secs, tempfile::tempdir().unwrap(), spool_path).await
    }

    async fn start_in(
        toml: &str,
        now_secs: i64,
        dir: tempfile::TempDir,
        spool_path: &Path,
    ) -> TestRelay {
        let opened = OpenSpool::Sqlite(Arc::new(SqliteSpool::open(spool_path).unwrap()));
        Self::start_on(toml, now_secs, dir, spool_path, opened, None).await
    }

    /// As [`TestRelay::start`], on a PostgreSQL spool in a fresh schema of
    /// the test database; `None` (the tests skipped) when none is configured.
    pub async fn start_postgres(toml: &str, now_secs: i64) -> Option<TestRelay> {
        let schema = TestSchema::new(&postgres::testing::test_url()?);
        Some(Self::start_on_schema(toml, now_secs, schema).await)
    }

    /// As [`TestRelay::start_postgres`], in `schema` as its settings say.
    pub async fn start_on_schema(toml: &str, now_secs: i64, schema: TestSchema) -> TestRelay {
        let spool = PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
            .await
            .unwrap_or_else(|e| panic!("the test database: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let opened = OpenSpool::Postgres(Arc::new(spool));
        let path = dir.path().join("unused.db");
        Self::start_on(toml, now_secs, dir, &path, opened, Some(schema)).await
    }

    /// As [`TestRelay::start`], its delivery workers looking in the spool
    /// only when woken (every hour unprompted); on PostgreSQL with
    /// `postgres`, `None` when no test database is configured.
    pub async fn start_woken_only(toml: &str, now_secs: i64, postgres: bool) -> Option<TestRelay> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let (opened, schema) = if postgres {
            let schema = TestSchema::new(&postgres::testing::test_url()?);
            let spool = PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
                .await
                .unwrap_or_else(|e| panic!("the test database: {e}"));
            (OpenSpool::Postgres(Arc::new(spool)), Some(schema))
        } else {
            let spool = SqliteSpool::open(&path).unwrap();
            (OpenSpool::Sqlite(Arc::new(spool)), None)
        };
        let hour = Some(Duration::from_secs(3_600));
        Some(Self::start_polling(toml, now_secs, dir, &path, opened, schema, hour).await)
    }

    async fn start_on(
        toml: &str,
        now_secs: i64,
        dir: tempfile::TempDir,
        spool_path: &Path,
        opened: OpenSpool,
        schema: Option<TestSchema>,
    ) -> TestRelay {
        Self::start_polling(toml, now_secs, dir, spool_path, opened, schema, None).await
    }

    async fn start_polling(
        toml: &str,
        now_secs: i64,
        dir: tempfile::TempDir,
        spool_path: &Path,
        opened: OpenSpool,
        schema: Option<TestSchema>,
        idle_poll: Option<Duration>,
    ) -> TestRelay {
        let spool = opened.operator();
        let clock = Arc::new(FixedClock::at_secs(now_secs));
        let relay = Self::launch(toml, opened.clone(), clock.clone(), &dir, idle_poll).await;
        TestRelay {
            addr: relay.public_addr,
            admin: relay.admin_addr,
            relay: Some(relay),
            spool,
            spool_path: spool_path.to_path_buf(),
            clock,
            dir,
            opened,
            schema,
            idle_poll,
        }
    }

    /// Closes the spool under the running relay.
    pub async fn close_spool(&self) {
        self.opened.clone().close().await;
    }

    /// Stops the relay and starts it again on `toml`, with the same spool and clock.
    pub async fn restart(&mut self, toml: &str) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
        let relay = Self::launch(
            toml,
            self.opened.clone(),
            self.clock.clone(),
            &self.dir,
            self.idle_poll,
        )
        .await;
        self.addr = relay.public_addr;
        self.admin = relay.admin_addr;
        self.relay = Some(relay);
    }

    /// The configuration file the relay reloads from.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("relay.toml")
    }

    async fn launch(
        toml: &str,
        spool: OpenSpool,
        clock: Arc<FixedClock>,
        dir: &tempfile::TempDir,
        idle_poll: Option<Duration>,
    ) -> Relay {
        let settings = Settings::from_toml_str(toml).unwrap_or_else(|e| panic!("test config: {e}"));
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, toml).unwrap();
        Relay::start(
            settings,
            Options {
                public: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                admin: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                spool: Some(spool),
                clock: Some(clock.clone()),
                config_path: Some(config_path),
                idle_poll,
            },
        )
        .await
        .unwrap()
    }

    pub async fn post(&self, path_and_query: &str, body: impl Into<Bytes>) -> Answer {
        send(self.addr, Method::POST, path_and_query, body.into()).await
    }

    /// A POST that owns what it needs, to spawn several at once.
    pub fn post_later(
        &self,
        path_and_query: String,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Answer> + Send + 'static {
        let addr = self.addr;
        async move { send(addr, Method::POST, &path_and_query, body.into()).await }
    }

    /// Waits until `target` has no pending delivery; false after 20 s.
    pub async fn until_nothing_pending(&self, target: &str) -> bool {
        let spool = self.spool.clone();
        eventually(Duration::from_secs(20), || {
            let spool = spool.clone();
            async move { spool.waiting(target, 1).await.unwrap().is_empty() }
        })
        .await
    }

    /// Waits until the first pending delivery of `target` has had `attempts`
    /// attempts recorded; false after 20 s.
    pub async fn until_attempts(&self, target: &str, attempts: u32) -> bool {
        let spool = self.spool.clone();
        eventually(Duration::from_secs(20), || {
            let spool = spool.clone();
            async move {
                let pending = spool.waiting(target, 1).await.unwrap();
                pending.first().is_some_and(|p| p.attempts == attempts)
            }
        })
        .await
    }

    /// Waits until `filter` selects a dead letter; false after 20 s.
    pub async fn until_dead_letter(&self, filter: DeadFilter) -> bool {
        let spool = self.spool.clone();
        eventually(Duration::from_secs(20), || {
            let (spool, filter) = (spool.clone(), filter.clone());
            async move { !spool.dead_letters(filter, 1).await.unwrap().is_empty() }
        })
        .await
    }

    /// No delivery is waiting in the spool.
    pub async fn nothing_pending(&self) -> bool {
        self.opened.health().depth().await.unwrap().is_empty()
    }

    pub async fn get(&self, path_and_query: &str) -> Answer {
        send(self.addr, Method::GET, path_and_query, Bytes::new()).await
    }

    /// A request to the admin listener.
    pub async fn admin(&self, method: Method, path: &str, bearer: Option<&str>) -> Answer {
        // A reload reads the environment; nothing else here does.
        let _environment = match path {
            "/admin/reload" => Some(ENVIRONMENT.lock().await),
            _ => None,
        };
        admin_request(self.admin, method, path, bearer).await
    }

    /// The metrics exposition from the admin listener.
    pub async fn metrics(&self) -> String {
        let answer = self.admin(Method::GET, "/metrics", None).await;
        assert_eq!(answer.status, 200);
        answer.text()
    }

    /// Every event stored as an `unrouted` dead letter, oldest first.
    pub async fn unrouted(&self) -> Vec<wxrelay::spool::Event> {
        let filter = DeadFilter {
            reason: Some(DeadReason::Unrouted),
            ..Default::default()
        };
        let mut dead = self.spool.dead_letters(filter, 100_000).await.unwrap();
        dead.sort_by_key(|d| d.event_id);
        let mut events = Vec::new();
        for d in dead {
            events.push(self.spool.event(d.event_id).await.unwrap().unwrap());
        }
        events
    }

    pub async fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn send(addr: SocketAddr, method: Method, path_and_query: &str, body: Bytes) -> Answer {
    try_send(addr, method, path_and_query, body).await.unwrap()
}

/// As [`send`], for a relay that may be gone: connection errors are returned.
pub async fn try_send(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    body: Bytes,
) -> Result<Answer, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", addr.to_string())
        .header("content-type", "text/xml")
        .body(Full::new(body))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
    })
}

/// The status line of the answer on a raw connection, read until the head
/// ends or the connection closes; a guard of 10 s stops a hung test, not a
/// slow relay.
pub async fn status_line(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer, not a hang");
    let text = String::from_utf8_lossy(&got).into_owned();
    text.lines().next().unwrap_or("").to_owned()
}

/// A request to an admin listener, with an optional bearer token.
pub async fn admin_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    bearer: Option<&str>,
) -> Answer {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    admin_request_authorized(addr, method, path, authorization.as_deref()).await
}

/// A request to an admin listener with this `Authorization` header, if any.
pub async fn admin_request_authorized(
    addr: SocketAddr,
    method: Method,
    path: &str,
    authorization: Option<&str>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    exchange(addr, req.body(Full::new(Bytes::new())).unwrap()).await
}

/// `req` on a fresh connection to `addr`, and its answer.
pub async fn exchange(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// One sample of a Prometheus text exposition: the value of `name` whose
/// labels include every pair in `labels`, summed over the other labels; 0
/// when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A child process (the real binary) that is killed when the test ends, even
/// when an assertion fails first.
pub struct Process(pub std::process::Child);

impl Process {
    /// SIGTERM, then the exit status: a graceful stop.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        self.0.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the real binary (`wxrelay ARGS`, stderr appended to `log`) and waits
/// until its admin listener answers /healthz. `None` when it exits first: the
/// ports chosen by [`free_port`] can be taken by another process meanwhile,
/// and the caller then tries again with fresh ones.
pub async fn start_binary(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    log: &std::path::Path,
    admin: SocketAddr,
) -> Option<Process> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let environment = ENVIRONMENT.lock().await;
    let mut process = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_wxrelay"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    drop(environment);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if process.0.try_wait().unwrap().is_some() {
            return None;
        }
        let health = try_send(admin, Method::GET, "/healthz", Bytes::new()).await;
        if health.is_ok_and(|a| a.status == 200) {
            return Some(process);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay came up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A text message to the plaintext account, signed for `now_secs`, carrying
/// `content` so the fake target can tell the pushes apart.
pub async fn push_text(relay: &TestRelay, g: &Value, msg_id: u64, content: &str) {
    let now = wxrelay::clock::Clock::now_secs(&*relay.clock);
    let (path, body) = text_push(g, now, "o_flap", msg_id, content);
    let answer = relay.post(&path, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// The path and body of a text message from `from_user` to the plaintext
/// account, signed for `now_secs`.
pub fn text_push(
    g: &Value,
    now_secs: i64,
    from_user: &str,
    msg_id: u64,
    content: &str,
) -> (String, Vec<u8>) {
    let xml = format!(
        "<xml><ToUserName><![CDATA[gh_relay]]></ToUserName><FromUserName><![CDATA[{from_user}]]></FromUserName>\
         <CreateTime>{now_secs}</CreateTime><MsgType><![CDATA[text]]></MsgType>\
         <Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId></xml>"
    );
    let nonce = format!("n{msg_id}");
    let push = wxrelay::wechat::push::build(
        &xml,
        wxrelay::wechat::push::Sealing::Plaintext,
        &wxrelay::wechat::push::PushParams {
            token: g["config"]["token"].as_str().unwrap(),
            app_id: g["config"]["appid"].as_str().unwrap(),
            timestamp: now_secs,
            nonce: &nonce,
            openid: None,
            random: &[0; 16],
        },
    );
    (
        format!("/wx/plaintext?{}", push.query),
        push.body.into_bytes(),
    )
}

/// POSTs `xml` from `openid` to the vectors' `account` (see
/// [`generated_config`]: its id is its mode, `rotating` is secure) as WeChat
/// would, stamped with the relay's clock; the query it was sent with and the
/// answer, which must be 200.
pub async fn push_as_wechat(
    relay: &TestRelay,
    g: &Value,
    account: &str,
    xml: &str,
    openid: &str,
) -> (String, Answer) {
    use wxrelay::wechat::push::{self, PushParams, Sealing};
    let c = &g["config"];
    let key =
        wxrelay::wechat::crypto::AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap())
            .unwrap();
    let sealing = match account {
        "plaintext" => Sealing::Plaintext,
        "compat" => Sealing::Compat(&key),
        _ => Sealing::Secure(&key),
    };
    let nonce = push::digits(9);
    let push = push::build(
        xml,
        sealing,
        &PushParams {
            token: c["token"].as_str().unwrap(),
            app_id: c["appid"].as_str().unwrap(),
            timestamp: wxrelay::clock::Clock::now_secs(&*relay.clock),
            nonce: &nonce,
            openid: Some(openid),
            random: &wxrelay::wechat::reply::random_bytes(),
        },
    );
    let answer = relay
        .post(&format!("/wx/{account}?{}", push.query), push.body)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    (push.query, answer)
}

/// As [`wxrelay`], with `env` set for the binary alone.
pub async fn run_wxrelay(
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let _environment = ENVIRONMENT.blocking_lock();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxrelay"))
            .args(&args)
            .envs(env)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    })
    .await
    .unwrap()
}

/// Waits until no delivery of `target` is due or being sent: every one
/// still pending waits for a time after now.
pub async fn quiet(relay: &TestRelay, target: &str) -> bool {
    let (spool, clock) = (relay.spool.clone(), relay.clock.clone());
    eventually(Duration::from_secs(20), || {
        let (spool, clock) = (spool.clone(), clock.clone());
        async move {
            let now = wxrelay::clock::Clock::now_ms(&*clock);
            let pending = spool.waiting(target, 100_000).await.unwrap();
            pending.iter().all(|p| p.next_at.0 > now)
        }
    })
    .await
}

/// Runs the real binary (`wxrelay ARGS`) off the runtime's thread, so a
/// relay or target in this test keeps serving: its exit code and its output
/// (standard output, then standard error).
pub async fn wxrelay(args: Vec<String>) -> (Option<i32>, String) {
    run_wxrelay(args, Vec::new()).await
}

/// The test binary's one process environment. Tests that set `WXRELAY_`
/// variables hold this while they are set, and whatever reads them (a spawned
/// binary, a reload) holds it too, so that no test runs on another's overrides.
/// Synchronous tests take it with `blocking_lock`, async ones with `lock`.
pub static ENVIRONMENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A free port on 127.0.0.1, for a process that binds it itself.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until `counter` (e.g. pushes sent so far, by concurrent senders)
/// reaches `n`; fails the test after a minute.
pub async fn until_reached(counter: &std::sync::atomic::AtomicUsize, n: usize) {
    let reached = eventually(Duration::from_secs(60), || {
        let reached = counter.load(std::sync::atomic::Ordering::SeqCst) >= n;
        async move { reached }
    })
    .await;
    assert!(reached, "the count reached {n}");
}

/// Polls `check` until it holds or `within` passes; for waiting on effects that
/// happen on other tasks, without sleeping a guessed amount.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
