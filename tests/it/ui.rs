//! The pages at `/ui` over real HTTP: signing in, the session cookie's flags,
//! CSRF refusals, the content security policy, escaping, and the overview's
//! dead-letter replay.

use crate::common;

use bytes::Bytes;
use common::target::{Behaviour, FakeTarget};
use common::{body, generated, generated_config, metric, path, reference_now, vector, Answer};
use common::{eventually, exchange, TestRelay};
use http::{Method, Request};
use http_body_util::Full;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use wxrelay::spool::DeadFilter;

const WAIT: Duration = Duration::from_secs(20);
pub const TOKEN: &str = "a-long-admin-token-for-the-pages";

/// The vectors' accounts, one target `hooks` at `url` that every push goes
/// to, and `server` keys.
pub fn config(g: &Value, url: &str, server: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n{}\n\
         [targets.hooks]\nurl = \"{url}\"\nretry_schedule = [\"1s\"]\n\n[[routes]]\nto = [\"hooks\"]\n",
        generated_config(g)
    )
}

/// A browser without a browser: one session cookie, kept between requests.
pub struct Visitor {
    admin: SocketAddr,
    pub cookie: Option<String>,
}

impl Visitor {
    pub fn new(admin: SocketAddr) -> Self {
        Visitor {
            admin,
            cookie: None,
        }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(Method::POST, path, Some(form)).await
    }

    async fn send(&mut self, method: Method, path: &str, form: Option<String>) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.admin.to_string());
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", cookie);
        }
        if form.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let req = req.body(Full::new(Bytes::from(form.unwrap_or_default())));
        let answer = exchange(self.admin, req.unwrap()).await;
        if let Some(set) = answer.headers.get("set-cookie") {
            let pair = set.to_str().unwrap().split(';').next().unwrap();
            self.cookie = Some(pair.to_owned()).filter(|p| !p.ends_with('='));
        }
        answer
    }

    /// Signs in with `token`; the answer to the form.
    pub async fn sign_in(&mut self, token: &str) -> Answer {
        self.post("/ui/signin", &[("token", token)]).await
    }
}

/// The CSRF token a page's forms carry.
pub fn csrf(page: &str) -> String {
    let (_, rest) = page
        .split_once("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token");
    rest.split('"').next().unwrap().to_owned()
}

fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer.headers.get(name).map_or("", |v| v.to_str().unwrap())
}

/// The relay with an admin token and `hooks` as its one target, and a
/// visitor signed in to it.
async fn signed_in(g: &Value, hooks: &FakeTarget) -> (TestRelay, Visitor) {
    signed_in_on(g, hooks, false).await.unwrap()
}

/// As [`signed_in`], on a PostgreSQL spool with `postgres`: `None` (the
/// test skipped) when no test database is configured.
async fn signed_in_on(
    g: &Value,
    hooks: &FakeTarget,
    postgres: bool,
) -> Option<(TestRelay, Visitor)> {
    let server = format!("admin_token = \"{TOKEN}\"");
    let toml = config(g, &hooks.url("/"), &server);
    let relay = match postgres {
        true => TestRelay::start_postgres(&toml, reference_now(g)).await?,
        false => TestRelay::start(&toml, reference_now(g)).await,
    };
    let mut visitor = Visitor::new(relay.admin);
    assert_eq!(visitor.sign_in(TOKEN).await.status, 303);
    Some((relay, visitor))
}

#[tokio::test]
async fn signing_in_takes_the_admin_token_and_sets_a_strict_http_only_cookie() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"");
    let toml = config(&g, &hooks.url("/"), &server);
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let mut visitor = Visitor::new(relay.admin);

    let away = visitor.get("/ui").await;
    assert_eq!(away.status, 303);
    assert_eq!(header(&away, "location"), "/ui/signin");
    let form = visitor.get("/ui/signin").await;
    assert_eq!(form.status, 200);
    assert!(form.text().contains("name=\"token\""), "{}", form.text());
    for answer in [&away, &form] {
        let csp = header(answer, "content-security-policy");
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
    }

    let wrong = visitor.sign_in("not-the-token").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("wrong admin token"));
    assert!(
        wrong.text().contains("name=\"token\""),
        "the form, to try again"
    );
    assert!(visitor.cookie.is_none());
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_ui_refusals_total", &[("reason", "bad_token")]),
        1.0
    );

    let signed_in = visitor.sign_in(TOKEN).await;
    assert_eq!(signed_in.status, 303);
    let cookie = header(&signed_in, "set-cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");
    assert!(!cookie.contains(TOKEN), "the cookie never holds the token");
    let overview = visitor.get("/ui").await;
    assert_eq!(overview.status, 200);
    assert!(overview.text().contains("hooks"), "{}", overview.text());
    assert!(header(&overview, "content-security-policy").starts_with("default-src 'self'"));

    // A session of another token (a cookie forged or from before a token
    // change) is not one.
    let tampered = visitor.cookie.clone().unwrap().replace('.', ".0");
    visitor.cookie = Some(tampered);
    assert_eq!(visitor.get("/ui").await.status, 303);
    relay.stop().await;
}

#[tokio::test]
async fn the_cookie_is_secure_when_configured() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"\nui_secure_cookie = true");
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), &server), reference_now(&g)).await;
    let mut visitor = Visitor::new(relay.admin);
    let signed_in = visitor.sign_in(TOKEN).await;
    assert!(header(&signed_in, "set-cookie").contains("; Secure"));
    relay.stop().await;
}

#[tokio::test]
async fn a_change_without_its_sessions_csrf_token_is_refused() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let (relay, mut visitor) = signed_in(&g, &hooks).await;
    let mine = csrf(&visitor.get("/ui").await.text());
    let mut other = Visitor::new(relay.admin);
    other.sign_in(TOKEN).await;
    let theirs = csrf(&other.get("/ui").await.text());
    assert_ne!(mine, theirs);

    let none = visitor.post("/ui/replay", &[("delivery_id", "1")]).await;
    assert_eq!(none.status, 403);
    assert!(none.text().contains("CSRF token"), "{}", none.text());
    let foreign = [("delivery_id", "1"), ("csrf", theirs.as_str())];
    assert_eq!(visitor.post("/ui/replay", &foreign).await.status, 403);
    let mut stranger = Visitor::new(relay.admin);
    let unsigned = [("delivery_id", "1"), ("csrf", mine.as_str())];
    assert_eq!(stranger.post("/ui/replay", &unsigned).await.status, 401);
    let signout = visitor.post("/ui/signout", &[]).await;
    assert_eq!(signout.status, 403);

    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_ui_refusals_total", &[("reason", "csrf")]),
        3.0
    );
    assert_eq!(
        metric(&m, "wxrelay_ui_refusals_total", &[("reason", "signed_out")]),
        1.0
    );
    // Signing out with the token clears the cookie.
    let out = visitor
        .post("/ui/signout", &[("csrf", mine.as_str())])
        .await;
    assert_eq!(out.status, 303);
    assert!(header(&out, "set-cookie").contains("Max-Age=0"));
    assert_eq!(visitor.get("/ui").await.status, 303);
    relay.stop().await;
}

#[tokio::test]
async fn the_overview_escapes_a_targets_answer_and_replays_its_dead_letter() {
    overview_escapes_and_replays(false).await;
}

#[tokio::test]
async fn the_overview_replays_a_dead_letter_on_postgres() {
    overview_escapes_and_replays(true).await;
}

async fn overview_escapes_and_replays(postgres: bool) {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let evil = "<script>alert('owned')</script>";
    hooks.set_default(Behaviour::body(400, "text/html", evil));
    let Some((relay, mut visitor)) = signed_in_on(&g, &hooks, postgres).await else {
        return;
    };
    let click = &vector(&g, "secure.CLICK")["request"];
    assert_eq!(
        relay.post(&path("secure", click), body(click)).await.status,
        200
    );
    assert!(relay.until_dead_letter(DeadFilter::default()).await);

    let overview = visitor.get("/ui").await.text();
    assert!(!overview.contains(evil), "{overview}");
    assert!(overview.contains("&lt;script&gt;alert('owned')&lt;/script&gt;"));
    assert!(overview.contains("rejected"), "{overview}");

    hooks.set_default(Behaviour::status(200));
    let dead = relay
        .spool
        .dead_letters(DeadFilter::default(), 1)
        .await
        .unwrap();
    let id = dead[0].delivery_id.to_string();
    // The event's page offers the same dead letter for replay.
    let event = visitor
        .get(&format!("/ui/event/{}", dead[0].event_id))
        .await
        .text();
    let offered = format!("name=\"delivery_id\" value=\"{id}\"");
    assert!(
        event.contains("Replay this dead letter") && event.contains(&offered),
        "{event}"
    );
    assert!(
        event.contains("hooks: dead") && event.contains("rejected"),
        "{event}"
    );
    let token = csrf(&overview);
    let form = [
        ("csrf", token.as_str()),
        ("delivery_id", &id),
        ("target", "hooks"),
    ];
    let replayed = visitor.post("/ui/replay", &form).await;
    assert_eq!(replayed.status, 303);
    assert!(hooks.wait_for(2, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);
    let spool = relay.spool.clone();
    let gone = eventually(WAIT, || {
        let spool = spool.clone();
        async move {
            spool
                .dead_letters(DeadFilter::default(), 1)
                .await
                .unwrap()
                .is_empty()
        }
    });
    assert!(gone.await);
    relay.stop().await;
}

#[tokio::test]
async fn without_an_admin_token_there_is_no_form_but_changes_still_need_the_csrf_token() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), ""), reference_now(&g)).await;
    let mut visitor = Visitor::new(relay.admin);
    let overview = visitor.get("/ui").await;
    assert_eq!(overview.status, 200);
    assert!(!overview.text().contains("name=\"token\""));
    assert!(!overview.text().contains("Sign out"));
    assert!(visitor.cookie.is_some());
    assert_eq!(visitor.get("/ui/signin").await.status, 303);
    let css = visitor.get("/ui/style.css").await;
    assert_eq!(header(&css, "content-type"), "text/css; charset=utf-8");
    assert_eq!(
        visitor
            .post("/ui/replay", &[("delivery_id", "1")])
            .await
            .status,
        403
    );
    relay.stop().await;
}

/// The OpenID of the `scan_str` vectors' sender.
pub const OPENID: &str = "oRlyT3stUserOpenId0000000002";

#[tokio::test]
async fn a_search_by_openid_finds_the_push_and_its_page_shows_each_attempt_escaped() {
    search_and_open(false).await;
}

#[tokio::test]
async fn the_search_and_an_events_page_on_postgres() {
    search_and_open(true).await;
}

async fn search_and_open(postgres: bool) {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let evil = "<img src=x onerror=alert(1)>";
    hooks.script([Behaviour::body(503, "text/html", evil)]);
    let Some((relay, mut visitor)) = signed_in_on(&g, &hooks, postgres).await else {
        return;
    };
    let scan = &vector(&g, "secure.scan_str")["request"];
    assert_eq!(
        relay.post(&path("secure", scan), body(scan)).await.status,
        200
    );
    assert!(hooks.wait_for(1, WAIT).await);
    // The failure recorded before the clock moves, or the retry would be
    // scheduled from the moved clock.
    assert!(relay.until_attempts("hooks", 1).await);
    relay.clock.advance_ms(2_000);
    assert!(hooks.wait_for(2, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);

    let search = visitor.get("/ui/search").await;
    assert_eq!(search.status, 200);
    assert!(search.text().contains("name=\"openid\""));
    // The trail may settle a moment after the target answered.
    let query = format!("/ui/search?openid={OPENID}&msg_id=&outcome=delivered");
    let (admin, cookie) = (relay.admin, visitor.cookie.clone());
    let listed = eventually(WAIT, || {
        let (query, cookie) = (query.clone(), cookie.clone());
        async move {
            let mut v = Visitor { admin, cookie };
            v.get(&query).await.text().contains("/ui/event/")
        }
    });
    assert!(listed.await);
    let found = visitor.get(&query).await.text();
    assert!(found.contains("oRly…0002"), "{found}");
    assert!(!found.contains(OPENID), "the OpenID is masked: {found}");
    assert!(found.contains("login:7f3c2a9e1b"), "the scene: {found}");
    let (_, link) = found.split_once("href=\"/ui/event/").unwrap();
    let id = link.split('"').next().unwrap();

    let event = visitor.get(&format!("/ui/event/{id}")).await;
    assert_eq!(event.status, 200);
    let page = event.text();
    for shown in [
        "received",
        "verified",
        "routed",
        "HTTP 503",
        "HTTP 200",
        "hooks: delivered",
    ] {
        assert!(page.contains(shown), "{shown} in {page}");
    }
    assert!(page.find("HTTP 503") < page.find("HTTP 200"), "in order");
    assert!(!page.contains(evil), "{page}");
    assert!(
        page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    assert!(!page.contains(OPENID));
    assert!(header(&event, "content-security-policy").starts_with("default-src 'self'"));

    // Delivered, and its body not kept: nothing to redeliver.
    let token = csrf(&page);
    let form = [
        ("csrf", token.as_str()),
        ("event_id", id),
        ("target", "hooks"),
    ];
    let refused = visitor.post("/ui/redeliver", &form).await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(visitor.get("/ui/event/999999").await.status, 404);
    // The login delivery (a SCAN) is on the overview's chart.
    let overview = visitor.get("/ui").await.text();
    assert!(
        overview.contains("<svg") && overview.contains("<polyline"),
        "{overview}"
    );
    assert!(overview.contains("over 1 delivery"), "{overview}");
    // No page needs script: none has any.
    for page in [&found, &page, &overview] {
        assert!(!page.contains("<script"), "{page}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_search_it_cannot_read_is_refused_with_its_reason() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let (relay, mut visitor) = signed_in(&g, &hooks).await;
    let answer = visitor.get("/ui/search?outcome=lost").await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.text().contains("unknown outcome"),
        "{}",
        answer.text()
    );
    let bad_time = visitor.get("/ui/search?since=yesterday-ish").await;
    assert_eq!(bad_time.status, 400);
    assert!(bad_time.text().contains("since"), "{}", bad_time.text());
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_ui_refusals_total", &[("reason", "bad_query")]),
        2.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_refused_push_is_counted_on_the_overview_and_found_by_its_outcome() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let (relay, mut visitor) = signed_in(&g, &hooks).await;
    let click = &vector(&g, "secure.CLICK")["request"];
    let forged = path("secure", click).replace("signature=", "signature=0");
    assert_eq!(relay.post(&forged, body(click)).await.status, 401);

    let overview = visitor.get("/ui").await.text();
    let (_, refusals) = overview.split_once("Refused pushes").unwrap();
    assert!(refusals.contains("bad_signature"), "{refusals}");
    let (admin, cookie) = (relay.admin, visitor.cookie.clone());
    let found = eventually(WAIT, || {
        let cookie = cookie.clone();
        async move {
            let mut v = Visitor { admin, cookie };
            let page = v.get("/ui/search?outcome=refused").await.text();
            page.contains("badge refused")
        }
    });
    assert!(found.await);
    relay.stop().await;
}

#[tokio::test]
async fn a_kept_event_is_redelivered_from_its_page() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"");
    let toml = config(&g, &hooks.url("/"), &server) + "\n[trail]\nkeep_bodies = true\n";
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let click = &vector(&g, "secure.CLICK")["request"];
    assert_eq!(
        relay.post(&path("secure", click), body(click)).await.status,
        200
    );
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);

    let mut visitor = Visitor::new(relay.admin);
    visitor.sign_in(TOKEN).await;
    let listed = visitor.get("/ui/search?outcome=delivered").await.text();
    let (_, link) = listed.split_once("href=\"/ui/event/").expect("the event");
    let id = link.split('"').next().unwrap().to_owned();
    let page = visitor.get(&format!("/ui/event/{id}")).await.text();
    assert!(page.contains("action=\"/ui/redeliver\""), "{page}");
    let token = csrf(&page);
    let back = format!("/ui/event/{id}");
    let form = [
        ("csrf", token.as_str()),
        ("event_id", id.as_str()),
        ("target", "hooks"),
        ("back", back.as_str()),
    ];
    let sent = visitor.post("/ui/redeliver", &form).await;
    assert_eq!(sent.status, 303, "{}", sent.text());
    assert_eq!(header(&sent, "location"), back);
    assert!(hooks.wait_for(2, WAIT).await);
    let received = hooks.received();
    assert_eq!(received[0].body, received[1].body, "the same push again");
    relay.stop().await;
}

#[tokio::test]
async fn with_the_trail_off_the_search_says_so() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"");
    let toml = config(&g, &hooks.url("/"), &server) + "\n[trail]\nenabled = false\n";
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let mut visitor = Visitor::new(relay.admin);
    visitor.sign_in(TOKEN).await;
    let page = visitor.get("/ui/search?outcome=dead").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("The trail is off"), "{}", page.text());
    relay.stop().await;
}

/// A request to the admin listener naming `host` in its `Host` header.
async fn as_host(admin: SocketAddr, path: &str, host: &str) -> Answer {
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", host)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    exchange(admin, req).await
}

/// A page of another site whose name was rebound to the loopback address
/// reaches the admin listener with its own name in `Host`: refused.
#[tokio::test]
async fn a_request_naming_another_host_is_refused_on_the_admin_listener() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = "allow_unauthenticated_admin = true";
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), server), reference_now(&g)).await;
    let port = relay.admin.port();
    for path in ["/ui", "/admin/trail", "/ui/signin"] {
        let rebound = as_host(relay.admin, path, &format!("attacker.example:{port}")).await;
        assert_eq!(rebound.status, 421, "{path}: {}", rebound.text());
        assert!(rebound.text().contains("Host"), "{}", rebound.text());
    }
    let m = relay.metrics().await;
    let refused = metric(&m, "wxrelay_admin_refusals_total", &[("reason", "host")]);
    assert_eq!(refused, 3.0);
    // Its own address and localhost are served.
    let own = as_host(relay.admin, "/admin/trail", &relay.admin.to_string()).await;
    assert_eq!(own.status, 200, "{}", own.text());
    let local = as_host(relay.admin, "/admin/trail", &format!("localhost:{port}")).await;
    assert_eq!(local.status, 200, "{}", local.text());
    // Health and metrics stay open to probes and scrapers under any name.
    let probe = as_host(relay.admin, "/healthz", "wxrelay.svc.cluster.local").await;
    assert_eq!(probe.status, 200);
    relay.stop().await;
}

/// How a `Host` is read: any case, a trailing dot, an IPv6 literal that is
/// not the listener's, and the absolute form's authority over the header.
#[tokio::test]
async fn host_names_are_read_in_any_case_and_the_absolute_form_wins() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"");
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), &server), reference_now(&g)).await;
    let port = relay.admin.port();
    for (host, status) in [
        (format!("LOCALHOST:{port}"), 200),
        (format!("localhost.:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::1]:{port}"), 421),
        (format!("evil.example.:{port}"), 421),
    ] {
        let answer = as_host(relay.admin, "/admin/trail", &host).await;
        assert_eq!(answer.status, status, "{host}: {}", answer.text());
    }
    // The request line's authority is the host asked for, whatever the header says.
    let absolute = |uri: String| {
        Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header("host", relay.admin.to_string())
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let other = absolute(format!("http://evil.example:{port}/admin/trail"));
    assert_eq!(exchange(relay.admin, other).await.status, 421);
    let own = absolute(format!("http://localhost:{port}/admin/trail"));
    assert_eq!(exchange(relay.admin, own).await.status, 200);
    relay.stop().await;
}

/// Without a token (a loopback listener), a page of another site could
/// still make the browser POST to it: such a POST is refused by its
/// `Origin` or `Sec-Fetch-Site`.
#[tokio::test]
async fn a_post_from_a_page_of_another_site_is_refused() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), ""), reference_now(&g)).await;
    let post = |headers: &[(&str, String)]| {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/admin/reload")
            .header("host", relay.admin.to_string());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        exchange(relay.admin, req.body(Full::new(Bytes::new())).unwrap())
    };
    let own = format!("http://{}", relay.admin);
    for (headers, status) in [
        (vec![("origin", "http://evil.example".to_owned())], 403),
        (vec![("origin", "null".to_owned())], 200),
        (vec![("sec-fetch-site", "cross-site".to_owned())], 403),
        (vec![("origin", own.clone())], 200),
        (
            vec![("origin", own), ("sec-fetch-site", "same-origin".into())],
            200,
        ),
        (vec![], 200),
    ] {
        let answer = post(&headers).await;
        assert_eq!(answer.status, status, "{headers:?}: {}", answer.text());
    }
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_admin_refusals_total", &[("reason", "origin")]),
        2.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_name_listed_in_admin_hosts_is_served() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"\nadmin_hosts = [\"relay.internal\"]");
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), &server), reference_now(&g)).await;
    let listed = as_host(relay.admin, "/admin/trail", "Relay.Internal:8443").await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    let other = as_host(relay.admin, "/admin/trail", "other.internal").await;
    assert_eq!(other.status, 421, "{}", other.text());
    relay.stop().await;
}

/// Guessing the admin token from one client is slowed: after 5 failures in
/// a row each try waits before it is judged, and the right token is still
/// accepted once its wait is over (no lock-out of whoever shares the address).
#[tokio::test]
async fn failed_sign_ins_from_one_address_wait_but_the_right_token_gets_in() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"");
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), &server), reference_now(&g)).await;
    let mut visitor = Visitor::new(relay.admin);
    for guess in 0..5 {
        let wrong = visitor
            .sign_in(&format!("guess-number-{guess}-of-many"))
            .await;
        assert_eq!(wrong.status, 401, "guess {guess}");
    }
    let started = std::time::Instant::now();
    let waited = visitor.sign_in("guess-number-6-of-many").await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "the sixth try waits"
    );
    assert_eq!(waited.status, 401, "{}", waited.text());
    let started = std::time::Instant::now();
    let right = visitor.sign_in(TOKEN).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the next waits longer"
    );
    assert_eq!(right.status, 303, "after its wait the right token gets in");
    assert!(visitor.cookie.is_some());
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_ui_refusals_total", &[("reason", "bad_token")]),
        6.0
    );
    relay.stop().await;
}

/// A wrong bearer token on `/admin/*` counts against the same client as a
/// wrong sign-in: guessing there is slowed the same way.
#[tokio::test]
async fn wrong_bearer_tokens_count_toward_the_same_wait() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let server = format!("admin_token = \"{TOKEN}\"");
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), &server), reference_now(&g)).await;
    for guess in 0..5 {
        let token = format!("guess-number-{guess}-of-many");
        let wrong = common::admin_request(relay.admin, Method::GET, "/admin/trail", Some(&token));
        assert_eq!(wrong.await.status, 401, "guess {guess}");
    }
    let started = std::time::Instant::now();
    let mut visitor = Visitor::new(relay.admin);
    assert_eq!(visitor.sign_in("guess-number-6-of-many").await.status, 401);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "the sixth try waits"
    );
    let started = std::time::Instant::now();
    let right = common::admin_request(relay.admin, Method::GET, "/admin/trail", Some(TOKEN));
    assert_eq!(right.await.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the bearer waits too"
    );
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_admin_refusals_total", &[("reason", "token")]),
        5.0
    );
    relay.stop().await;
}

/// Signing out ends the session: its cookie, kept by someone, no longer
/// opens a page.
#[tokio::test]
async fn a_signed_out_session_cookie_is_refused_afterwards() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let (relay, mut visitor) = signed_in(&g, &hooks).await;
    let page = visitor.get("/ui").await;
    assert_eq!(page.status, 200);
    let kept = visitor.cookie.clone().unwrap();
    let token = csrf(&page.text());
    let out = visitor
        .post("/ui/signout", &[("csrf", token.as_str())])
        .await;
    assert_eq!(out.status, 303);
    let mut replayed = Visitor::new(relay.admin);
    replayed.cookie = Some(kept);
    let after = replayed.get("/ui").await;
    assert_eq!(after.status, 303, "{}", after.text());
    assert_eq!(header(&after, "location"), "/ui/signin");
    // Another session of the same token is still signed in.
    let mut other = Visitor::new(relay.admin);
    assert_eq!(other.sign_in(TOKEN).await.status, 303);
    assert_eq!(other.get("/ui").await.status, 200);
    relay.stop().await;
}
