//! Every admin-listener path the operator docs mention is one the relay serves:
//! the paths are read out of `README.md`, `relay.toml.example` and `deploy/`,
//! and each is asked of a running relay.

use crate::common;

use common::{generated, generated_config, reference_now, TestRelay};
use http::Method;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ADMIN_TOKEN: &str = "d0cs-admin-token";

/// How a path on the admin listener begins.
const ROOTS: [&str; 4] = ["/admin/", "/metrics", "/healthz", "/readyz"];

/// The documents operators read, relative to the crate root.
fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md"), root.join("relay.toml.example")];
    let mut dirs = vec![root.join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/')
}

/// The admin paths `text` mentions, each with the method written before it
/// (`POST /admin/reload`), GET when none is. A mention of a prefix
/// (`/admin/*`, `/admin/…`) names no path, and `src/metrics.rs` is a file.
fn mentions(text: &str) -> Vec<(Method, String)> {
    let mut found = Vec::new();
    for root in ROOTS {
        for (at, _) in text.match_indices(root) {
            let rest = &text[at..];
            let end = rest.find(|c| !is_path_char(c)).unwrap_or(rest.len());
            let path = rest[..end].trim_end_matches('/');
            let after = &rest[end..];
            let is_file = after.starts_with('.')
                && after[1..].starts_with(|c: char| c.is_ascii_alphanumeric());
            if is_file || path == "/admin" {
                continue;
            }
            let before = text[..at].trim_end_matches(' ');
            let method = ["POST", "GET", "PUT", "DELETE", "PATCH"]
                .into_iter()
                .find(|m| {
                    before.ends_with(m)
                        && !before[..before.len() - m.len()]
                            .ends_with(|c: char| c.is_ascii_alphanumeric())
                })
                .map_or(Method::GET, |m| m.parse().unwrap());
            found.push((method, path.to_owned()));
        }
    }
    found
}

/// Every documented (method, path), with where it is first mentioned.
fn documented() -> BTreeMap<(String, String), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = BTreeMap::new();
    for file in documents() {
        // Binary files mention no paths.
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (number, line) in text.lines().enumerate() {
            for (method, path) in mentions(line) {
                let place = format!(
                    "{}:{}",
                    file.strip_prefix(root).unwrap().display(),
                    number + 1
                );
                all.entry((method.to_string(), path)).or_insert(place);
            }
        }
    }
    all
}

#[test]
fn mentions_are_read_as_operators_read_them() {
    let text = "see `POST /admin/reload`, `GET /healthz` and http://127.0.0.1:9090/metrics.\n\
                /admin/* needs a token; src/metrics.rs; probes on /readyz/ (/admin/…)";
    let found: Vec<(String, String)> = mentions(text)
        .into_iter()
        .map(|(method, path)| (method.to_string(), path))
        .collect();
    let expected = [
        ("POST", "/admin/reload"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    ];
    assert_eq!(
        found,
        expected.map(|(m, p)| (m.to_owned(), p.to_owned())).to_vec()
    );
}

#[tokio::test]
async fn every_admin_path_the_docs_mention_is_served() {
    let documented = documented();
    // The parser must keep finding the paths every document has always named.
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("POST", "/admin/reload"),
    ] {
        assert!(
            documented.contains_key(&(method.to_owned(), path.to_owned())),
            "{method} {path} not found in the docs: {documented:?}"
        );
    }

    let g = generated();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         admin_token = \"{ADMIN_TOKEN}\"\n\n{}",
        generated_config(&g)
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let mut missing = Vec::new();
    for ((method, path), place) in &documented {
        let answer = relay
            .admin(method.parse().unwrap(), path, Some(ADMIN_TOKEN))
            .await;
        if answer.status == 404 {
            missing.push(format!("{method} {path} (mentioned at {place})"));
        }
    }
    relay.stop().await;
    assert!(
        missing.is_empty(),
        "documented admin paths the relay does not serve: {missing:?}"
    );
}
