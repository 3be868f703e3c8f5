//! The pages in a real browser: headless Chromium driven through WebDriver
//! (Debian's `chromium` and `chromium-driver`). It signs in, searches an
//! OpenID, opens the event and sees a failed attempt and a later delivered
//! one, replays a dead letter from the overview and sees it delivered,
//! checks that no page asked another host for anything, and saves
//! screenshots under `target/`.
//! Without Chromium the test is skipped with one line, except in CI
//! (`CI` set), where `.ci/run` installs it and its absence fails.

use crate::common;
use crate::ui::{OPENID, TOKEN};

use common::target::{Behaviour, FakeTarget};
use common::TestRelay;
use common::{body, eventually, generated, generated_config, path, reference_now, vector};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wxrelay::spool::DeadFilter;

const WAIT: Duration = Duration::from_secs(20);

/// A chromedriver process on a port of its choosing, ended on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` on the `PATH`.
fn installed(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Starts chromedriver, or says in one line why the test is skipped.
fn driver() -> Option<(Driver, PathBuf)> {
    let found = installed("chromedriver").zip(installed("chromium"));
    let Some((chromedriver, chromium)) = found else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium and chromium-driver (.ci/run does)"
        );
        eprintln!("skipped: no chromium/chromedriver (apt-get install chromium chromium-driver)");
        return None;
    };
    let mut child = Command::new(chromedriver)
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut driver = Driver {
        child,
        url: String::new(),
    };
    // "ChromeDriver was started successfully on port 33187."
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some((_, port)) = line.split_once("successfully on port ") {
            let port = port.trim_end_matches('.');
            driver.url = format!("http://127.0.0.1:{port}");
            return Some((driver, chromium));
        }
    }
    panic!("chromedriver ended without saying its port");
}

/// A headless Chromium session, `width` pixels wide.
async fn browser(driver: &Driver, chromium: &PathBuf, profile: &tempfile::TempDir) -> Client {
    let options = json!({
        "binary": chromium,
        "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--hide-scrollbars",
            "--window-size=1280,1200", format!("--user-data-dir={}", profile.path().display()),
        ],
    });
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap()
}

/// Saves what the browser shows as `target/{name}.png`.
async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Every address the page and what it loaded came from.
async fn origins_loaded(client: &Client) -> Vec<String> {
    let script = "return performance.getEntriesByType('resource').map(e => e.name)\
                  .concat(performance.getEntriesByType('navigation').map(e => e.name));";
    let names = client.execute(script, Vec::new()).await.unwrap();
    serde_json::from_value(names).unwrap()
}

/// Asserts that the current page asked nothing of any host but the relay's
/// admin listener.
async fn only_from(client: &Client, admin: SocketAddr) {
    let own = format!("http://{admin}/");
    let loaded = origins_loaded(client).await;
    assert!(!loaded.is_empty());
    for url in loaded {
        assert!(url.starts_with(&own), "the page loaded {url}");
    }
    // The stylesheet is ours, and it applied (the policy let it).
    let styled = client
        .execute(
            "return getComputedStyle(document.querySelector('header.top')).display;",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(styled, json!("flex"));
}

/// Asserts that nothing on the page is wider than the window: on a phone
/// it reads without scrolling sideways (wide tables scroll in their box).
async fn fits(client: &Client) {
    let width = "return [document.documentElement.scrollWidth, window.innerWidth];";
    let [page, screen]: [u32; 2] =
        serde_json::from_value(client.execute(width, Vec::new()).await.unwrap()).unwrap();
    let at = client.current_url().await.unwrap();
    assert!(
        page <= screen,
        "{at} is {page} px wide on a {screen} px screen"
    );
}

/// Two targets: `broker` for login events, `crm` for everything else.
fn config(g: &Value, broker: &str, crm: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n\n{}\n\
         [targets.broker]\nurl = \"{broker}\"\nretry_schedule = [\"1s\"]\n\n\
         [targets.crm]\nurl = \"{crm}\"\nretry_schedule = [\"1s\"]\n\n\
         [[routes]]\nmatch = {{ event = [\"subscribe\", \"SCAN\"] }}\nto = [\"broker\"]\n\n\
         [[routes]]\nto = [\"crm\"]\n",
        generated_config(g)
    )
}

async fn sign_in(client: &Client, relay: &TestRelay) {
    client
        .goto(&format!("http://{}/ui", relay.admin))
        .await
        .unwrap();
    assert!(client.current_url().await.unwrap().path() == "/ui/signin");
    only_from(client, relay.admin).await;
    screenshot(client, "ui-signin").await;
    let form = client
        .form(Locator::Css("form[action='/ui/signin']"))
        .await
        .unwrap();
    form.set_by_name("token", TOKEN).await.unwrap();
    form.submit().await.unwrap();
    // The sign-in page has an h1 too: wait for the overview's address.
    let overview = url::Url::parse(&format!("http://{}/ui", relay.admin)).unwrap();
    client.wait().for_url(&overview).await.unwrap();
    client.wait().for_element(Locator::Css("h1")).await.unwrap();
}

/// Searches the OpenID, opens the event, and finds a failed attempt and a
/// later delivered one; screenshots at 1280 and 375 pixels wide, where
/// nothing may be wider than the screen.
async fn follow_the_push(client: &Client, relay: &TestRelay) {
    let search = format!("http://{}/ui/search", relay.admin);
    client.goto(&search).await.unwrap();
    let form = client
        .form(Locator::Css("form[action='/ui/search']"))
        .await
        .unwrap();
    form.set_by_name("openid", OPENID).await.unwrap();
    form.submit().await.unwrap();
    let link = Locator::Css("a[href^='/ui/event/']");
    let found = client.wait().for_element(link).await.unwrap();
    only_from(client, relay.admin).await;
    screenshot(client, "ui-search").await;
    found.click().await.unwrap();
    client
        .wait()
        .for_element(Locator::Css("ol.timeline"))
        .await
        .unwrap();
    let timeline = client.find(Locator::Css("ol.timeline")).await.unwrap();
    let text = timeline.text().await.unwrap();
    let failed = text.find("broker → HTTP 503").expect("the failed attempt");
    let delivered = text
        .find("broker → HTTP 200")
        .expect("the delivered attempt");
    assert!(failed < delivered, "{text}");
    assert!(text.contains("broker: delivered"), "{text}");
    assert!(!client.source().await.unwrap().contains(OPENID));
    only_from(client, relay.admin).await;
    screenshot(client, "ui-event").await;

    client.set_window_size(375, 1400).await.unwrap();
    fits(client).await;
    screenshot(client, "ui-event-375").await;
    for page in ["/ui", "/ui/search"] {
        client
            .goto(&format!("http://{}{page}", relay.admin))
            .await
            .unwrap();
        fits(client).await;
    }
    screenshot(client, "ui-search-375").await;
    client.set_window_size(1280, 1200).await.unwrap();
}

/// Replays the dead letter with the overview's button and sees it gone.
async fn replay_from_the_overview(client: &Client, relay: &TestRelay, crm: &FakeTarget) {
    client
        .goto(&format!("http://{}/ui", relay.admin))
        .await
        .unwrap();
    let page = client.source().await.unwrap();
    assert!(page.contains("&lt;b&gt;no such user&lt;/b&gt;"), "{page}");
    crm.set_default(Behaviour::status(200));
    let replay = Locator::Css("form[action='/ui/replay'] button");
    client.find(replay).await.unwrap().click().await.unwrap();
    assert!(crm.wait_for(2, WAIT).await);
    assert!(relay.until_nothing_pending("crm").await);
    let emptied = eventually(WAIT, || async {
        client.refresh().await.unwrap();
        client.find(replay).await.is_err()
    });
    assert!(emptied.await, "the dead letter is gone from the page");
}

#[tokio::test]
async fn a_browser_follows_a_push_and_replays_a_dead_letter() {
    let Some((driver, chromium)) = driver() else {
        return;
    };
    let g = generated();
    let (broker, crm) = (FakeTarget::start().await, FakeTarget::start().await);
    broker.script([Behaviour::body(503, "text/plain", "busy, try later")]);
    crm.set_default(Behaviour::body(400, "text/plain", "<b>no such user</b>"));
    let toml = config(&g, &broker.url("/login"), &crm.url("/events"));
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    for id in ["secure.scan_str", "secure.text"] {
        let push = &vector(&g, id)["request"];
        assert_eq!(
            relay.post(&path("secure", push), body(push)).await.status,
            200
        );
    }
    assert!(broker.wait_for(1, WAIT).await);
    // The failure recorded before the clock moves, or the retry would be
    // scheduled from the moved clock.
    assert!(relay.until_attempts("broker", 1).await);
    relay.clock.advance_ms(2_000);
    assert!(broker.wait_for(2, WAIT).await);
    assert!(relay.until_nothing_pending("broker").await);
    assert!(relay.until_dead_letter(DeadFilter::default()).await);

    let profile = tempfile::tempdir().unwrap();
    let client = browser(&driver, &chromium, &profile).await;
    sign_in(&client, &relay).await;
    only_from(&client, relay.admin).await;
    assert!(client
        .find(Locator::Css("svg.chart polyline"))
        .await
        .is_ok());
    screenshot(&client, "ui-overview").await;
    follow_the_push(&client, &relay).await;
    replay_from_the_overview(&client, &relay, &crm).await;
    client.close().await.unwrap();
    relay.stop().await;
}
