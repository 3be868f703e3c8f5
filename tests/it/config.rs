//! The config contract: the shipped example loads; environment variables
//! override the file; a bad config is refused with every problem at its key
//! path; no secret is ever printed.

use crate::common::ENVIRONMENT;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;
use wxrelay::config::{
    figment_for, render_check, Breaker, Format, Mode, Ordering, RetryClass, Settings, SpoolBackend,
    SslMode,
};
use wxrelay::route::{route, RouteInput};

const TOKEN: &str = "Relay2024Token";
const AES_KEY: &str = "R3layV3ct0rsEncodingAesKeyForTests0123456Zq";
const WEBHOOK_SECRET: &str = "whsec_ZXhhbXBsZS1vbmx5LXJlcGxhY2UtdGhpcy1zZWNyZXQ=";

fn example_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml.example")
}

/// A small valid config; each broken case edits one thing in it.
const VALID: &str = r#"
[accounts.main]
app_id = "wx5f3c9a1e7d2b4c60"
token = "Relay2024Token"
encoding_aes_key = "R3layV3ct0rsEncodingAesKeyForTests0123456Zq"
mode = "secure"

[targets.broker]
url = "http://127.0.0.1:8081/broker"
retry = "login"

[targets.hooks]
url = "https://hooks.example.com/events"
format = "json"
secret = "whsec_ZXhhbXBsZS1vbmx5LXJlcGxhY2UtdGhpcy1zZWNyZXQ="

[[routes]]
match = { event = ["subscribe", "SCAN"] }
to = ["broker", "hooks"]
reply_from = "broker"

[[routes]]
to = ["hooks"]
"#;

const CATCH_ALL: &str = "[[routes]]\nto = [\"hooks\"]\n";

/// A PostgreSQL spool section, for cases to add keys to.
const PG: &str = "[spool]\nbackend = \"postgres\"\nurl = \"postgres://relay@db:5432/relay\"\n";

/// `VALID` with each `(from, to)` applied; `from` must occur, so that a
/// change to `VALID` cannot turn a case into a test of nothing.
fn edit(edits: &[(&str, &str)]) -> String {
    edits.iter().fold(VALID.to_owned(), |toml, (from, to)| {
        assert!(toml.contains(from), "{from:?} is not in the config");
        toml.replacen(from, to, 1)
    })
}

fn line(key: &str) -> String {
    VALID
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .expect("key in VALID")
        .to_owned()
}

#[test]
fn the_valid_base_is_valid() {
    let settings = Settings::from_toml_str(VALID).unwrap();
    assert!(settings.warnings().is_empty(), "{:?}", settings.warnings());
}

#[test]
fn the_shipped_example_loads() {
    let _env = ENVIRONMENT.blocking_lock();
    let settings = Settings::load(&example_path()).unwrap();

    let main = &settings.accounts["main"];
    assert_eq!(main.mode, Mode::Secure);
    assert_eq!(main.app_id, "wx5f3c9a1e7d2b4c60");
    assert_eq!(main.token.expose(), TOKEN);
    assert!(main.keys.is_some());
    assert_eq!(main.timestamp_window, Some(Duration::from_secs(300)));

    assert_eq!(settings.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(settings.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(settings.server.max_body, 256 * 1024);
    assert_eq!(
        settings.spool.backend,
        SpoolBackend::Sqlite {
            path: "./data/spool.db".into()
        }
    );

    assert_eq!(settings.targets.len(), 2);
    let broker = &settings.targets["broker"];
    assert_eq!(broker.format, Format::Raw);
    assert_eq!(broker.retry.class, RetryClass::Login);
    assert_eq!(broker.timeout, Duration::from_secs(3));
    let webhooks = &settings.targets["webhooks"];
    assert_eq!(webhooks.format, Format::Json);
    assert_eq!(webhooks.signing_key().map(|k| k.len()), Some(32));

    assert_eq!(settings.routes.len(), 2);
    assert_eq!(settings.routes[0].reply_from.as_deref(), Some("broker"));
    assert_eq!(settings.routes[0].to, ["broker", "webhooks"]);
    assert!(settings.routes[1].matcher.is_catch_all());
    assert!(settings.warnings().is_empty(), "{:?}", settings.warnings());
}

#[test]
fn the_example_routes_login_events_to_the_broker_and_the_rest_to_webhooks() {
    let settings =
        Settings::from_toml_str(&std::fs::read_to_string(example_path()).unwrap()).unwrap();
    let scan = RouteInput {
        account: "main",
        msg_type: "event",
        event: Some("SCAN"),
        event_key: Some("login_42"),
        has_ticket: true,
        from_user: "oUser",
    };
    let (index, rule) = route(&settings.routes, &scan).unwrap();
    assert_eq!((index, rule.reply_from.as_deref()), (0, Some("broker")));
    let text = RouteInput {
        msg_type: "text",
        event: None,
        event_key: None,
        has_ticket: false,
        ..scan
    };
    let (index, rule) = route(&settings.routes, &text).unwrap();
    assert_eq!(
        (index, rule.to.as_slice()),
        (1, ["webhooks".to_owned()].as_slice())
    );
}

#[test]
fn environment_variables_override_the_file() {
    let _env = ENVIRONMENT.blocking_lock();
    let overrides = [
        ("WXRELAY_ACCOUNTS__MAIN__TOKEN", "FromTheEnvironment1"),
        ("WXRELAY_SERVER__LISTEN", "127.0.0.1:18080"),
        ("WXRELAY_TARGETS__BROKER__CONCURRENCY", "3"),
        // Not a config key (no `__`): must not be mistaken for one.
        ("WXRELAY_LOG", "debug"),
    ];
    for (key, value) in overrides {
        std::env::set_var(key, value);
    }
    let loaded = Settings::from_figment(figment_for(&example_path()));
    for (key, _) in overrides {
        std::env::remove_var(key);
    }

    let settings = loaded.unwrap();
    assert_eq!(
        settings.accounts["main"].token.expose(),
        "FromTheEnvironment1"
    );
    assert_eq!(settings.server.listen.to_string(), "127.0.0.1:18080");
    assert_eq!(settings.targets["broker"].concurrency, 3);
    // Untouched keys keep the file's values.
    assert_eq!(settings.server.admin_listen.to_string(), "127.0.0.1:9090");
}

/// figment lower-cases the keys of `WXRELAY_` variables, so an id with an
/// upper-case letter could never be overridden: such ids are refused, at the
/// id's key path.
#[test]
fn upper_case_ids_are_refused_because_the_environment_cannot_name_them() {
    let toml = edit(&[
        ("[accounts.main]", "[accounts.Shop]"),
        ("[targets.broker]", "[targets.Broker]"),
        (
            "to = [\"broker\", \"hooks\"]",
            "to = [\"Broker\", \"hooks\"]",
        ),
        ("reply_from = \"broker\"", "reply_from = \"Broker\""),
    ]);
    let err = Settings::from_toml_str(&toml).unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert_has(&err, "accounts.Shop", "lower-case");
    assert_has(&err, "accounts.Shop", "WXRELAY_ACCOUNTS__SHOP__");
    assert_has(&err, "targets.Broker", "lower-case");
    assert_has(&err, "targets.Broker", "WXRELAY_TARGETS__BROKER__");

    // `__` splits a variable's keys: these names could not be addressed either.
    let toml = edit(&[
        ("[accounts.main]", "[accounts.shop__eu]"),
        ("[targets.broker]", "[targets.broker_]"),
        (
            "to = [\"broker\", \"hooks\"]",
            "to = [\"broker_\", \"hooks\"]",
        ),
        ("reply_from = \"broker\"", "reply_from = \"broker_\""),
    ]);
    let err = Settings::from_toml_str(&toml).unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert_has(&err, "accounts.shop__eu", "must not contain \"__\"");
    assert_has(&err, "targets.broker_", "end in \"_\"");

    // A lower-case id, with `_` and `-`, is overridden through the environment.
    let _env = ENVIRONMENT.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let toml = edit(&[("[accounts.main]", "[accounts.shop_eu-2]")]);
    std::fs::write(&path, toml).unwrap();
    std::env::set_var("WXRELAY_ACCOUNTS__SHOP_EU-2__TOKEN", "FromTheEnvironment2");
    let loaded = Settings::from_figment(figment_for(&path));
    std::env::remove_var("WXRELAY_ACCOUNTS__SHOP_EU-2__TOKEN");
    let settings = loaded.unwrap();
    assert_eq!(
        settings.accounts["shop_eu-2"].token.expose(),
        "FromTheEnvironment2"
    );
}

#[test]
fn a_bad_environment_variable_is_reported_at_its_key() {
    let _env = ENVIRONMENT.blocking_lock();
    std::env::set_var("WXRELAY_ACCOUNTS__MAIN__TOKEN", "no!");
    let loaded = Settings::from_figment(figment_for(&example_path()));
    std::env::remove_var("WXRELAY_ACCOUNTS__MAIN__TOKEN");
    assert_has(
        &loaded.unwrap_err(),
        "accounts.main.token",
        "letters and digits",
    );
}

#[test]
fn a_missing_file_is_named() {
    let err = Settings::load(Path::new("/nonexistent/relay.toml")).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].path, "/nonexistent/relay.toml");
    assert!(err.to_string().contains("cannot read config file"), "{err}");
}

fn assert_has(err: &wxrelay::config::ConfigError, path: &str, fragment: &str) {
    assert!(
        err.problems
            .iter()
            .any(|p| p.path == path && p.message.contains(fragment)),
        "expected `{path}: …{fragment}…` among:\n{err}"
    );
}

#[test]
fn broken_configs_are_refused_at_their_key_path() {
    let key_42 = &AES_KEY[..42];
    let key_bad_char = format!("{}+", &AES_KEY[..42]);
    let token_33 = "a".repeat(33);
    let after_catch_all =
        format!("{VALID}[[routes]]\nmatch = {{ event = \"CLICK\" }}\nto = [\"broker\"]\n");
    let shadowed = format!(
        "[[routes]]\nmatch = {{ event = \"scan\", has_ticket = true }}\nto = [\"broker\"]\n\n{CATCH_ALL}"
    );
    let key_line = line("encoding_aes_key");
    let mode_line = line("mode");
    let secret_line = line("secret");

    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "a trail keeping no event",
            format!("{VALID}\n[trail]\nmax_events = 0\n"),
            "trail.max_events",
            "at least 1",
        ),
        (
            "a trail keeping no refusal",
            format!("{VALID}\n[trail]\nmax_refusals = 0\n"),
            "trail.max_refusals",
            "at least 1",
        ),
        (
            "a trail retention that is not a duration",
            format!("{VALID}\n[trail]\nretain = \"a week\"\n"),
            "trail.retain",
            "",
        ),
        (
            "a short trail key",
            format!("{VALID}\n[trail]\nkey = \"short\"\n"),
            "trail.key",
            "at least 16 characters",
        ),
        (
            "a trail key twice",
            format!("{VALID}\n[trail]\nkey = \"0123456789abcdef\"\nkey_file = \"/k\"\n"),
            "trail.key_file",
            "not both",
        ),
        (
            "admin token too short to resist guessing",
            format!("[server]\nadmin_token = \"short-token\"\n{VALID}"),
            "server.admin_token",
            "at least 16 bytes",
        ),
        (
            "admin token with a space",
            format!("[server]\nadmin_token = \" padded-admin-token\"\n{VALID}"),
            "server.admin_token",
            "visible ASCII",
        ),
        (
            "unknown top-level key",
            format!("colour = \"blue\"\n{VALID}"),
            "",
            "unknown field `colour`",
        ),
        (
            "unknown account key",
            edit(&[("token =", "tokn =")]),
            "accounts.main",
            "unknown field `tokn`",
        ),
        (
            "unknown target key",
            edit(&[("retry = \"login\"", "retries = 3")]),
            "targets.broker",
            "unknown field `retries`",
        ),
        (
            "unknown match key",
            edit(&[("event = [", "evnt = [")]),
            "routes[0].match",
            "unknown field `evnt`",
        ),
        (
            "key too short",
            edit(&[(AES_KEY, key_42)]),
            "accounts.main.encoding_aes_key",
            "must be 43 characters, got 42",
        ),
        (
            "key with a bad character",
            edit(&[(AES_KEY, &key_bad_char)]),
            "accounts.main.encoding_aes_key",
            "only letters and digits",
        ),
        (
            "token too short",
            edit(&[(TOKEN, "ab")]),
            "accounts.main.token",
            "3 to 32",
        ),
        (
            "token too long",
            edit(&[(TOKEN, &token_33)]),
            "accounts.main.token",
            "got 33",
        ),
        (
            "token with punctuation",
            edit(&[(TOKEN, "Relay-2024")]),
            "accounts.main.token",
            "only ASCII letters and digits",
        ),
        (
            "token and token_file",
            edit(&[(
                &line("token"),
                "token = \"Relay2024Token\"\ntoken_file = \"/run/secrets/t\"",
            )]),
            "accounts.main.token_file",
            "not both",
        ),
        (
            "neither token nor token_file",
            edit(&[(&line("token"), "")]),
            "accounts.main.token",
            "required",
        ),
        (
            "unreadable token_file",
            edit(&[(&line("token"), "token_file = \"/nonexistent/token\"")]),
            "accounts.main.token_file",
            "cannot read /nonexistent/token",
        ),
        (
            "missing mode",
            edit(&[(&mode_line, "")]),
            "accounts.main.mode",
            "required",
        ),
        (
            "unknown mode",
            edit(&[("\"secure\"", "\"encrypted\"")]),
            "accounts.main.mode",
            "unknown mode \"encrypted\"",
        ),
        (
            "secure without a key",
            edit(&[(&key_line, "")]),
            "accounts.main.encoding_aes_key",
            "required when mode is secure",
        ),
        (
            "compat without a key",
            edit(&[(&key_line, ""), ("\"secure\"", "\"compat\"")]),
            "accounts.main.encoding_aes_key",
            "required when mode is compat",
        ),
        (
            "previous key without a key",
            edit(&[
                (
                    &key_line,
                    &format!("previous_encoding_aes_key = \"{AES_KEY}\""),
                ),
                ("\"secure\"", "\"plaintext\""),
            ]),
            "accounts.main.previous_encoding_aes_key",
            "requires encoding_aes_key",
        ),
        (
            "previous key equal to the key",
            edit(&[(
                &key_line,
                &format!("{key_line}\nprevious_encoding_aes_key = \"{AES_KEY}\""),
            )]),
            "accounts.main.previous_encoding_aes_key",
            "must differ",
        ),
        (
            "bad app_id",
            edit(&[("wx5f3c9a1e7d2b4c60", "wx5f3c9a1e7d2b4c6")]),
            "accounts.main.app_id",
            "\"wx\" followed by 16 hex digits",
        ),
        (
            "bad account id",
            edit(&[("[accounts.main]", "[accounts.\"main account\"]")]),
            "accounts.main account",
            "account id must be",
        ),
        (
            "unknown target in to",
            edit(&[("to = [\"broker\", \"hooks\"]", "to = [\"broker\", \"crm\"]")]),
            "routes[0].to",
            "unknown target \"crm\"",
        ),
        (
            "duplicate target in to",
            edit(&[(
                "to = [\"broker\", \"hooks\"]",
                "to = [\"broker\", \"hooks\", \"broker\"]",
            )]),
            "routes[0].to",
            "twice",
        ),
        (
            "empty to",
            edit(&[("to = [\"hooks\"]", "to = []")]),
            "routes[1].to",
            "at least one target",
        ),
        (
            "reply_from not among to",
            edit(&[("to = [\"broker\", \"hooks\"]", "to = [\"hooks\"]")]),
            "routes[0].reply_from",
            "must be one of `to`",
        ),
        (
            "reply_from not a target",
            edit(&[("reply_from = \"broker\"", "reply_from = \"crm\"")]),
            "routes[0].reply_from",
            "unknown target \"crm\"",
        ),
        (
            "unreachable after a catch-all",
            after_catch_all,
            "routes[2]",
            "unreachable: routes[1] (*)",
        ),
        (
            "unreachable under a wider rule",
            edit(&[(CATCH_ALL, &shadowed)]),
            "routes[1]",
            "unreachable: routes[0] (event=subscribe|SCAN)",
        ),
        (
            "unknown match account",
            edit(&[("event = [\"subscribe\", \"SCAN\"]", "account = \"other\"")]),
            "routes[0].match.account",
            "unknown account \"other\"",
        ),
        (
            "empty match list",
            edit(&[("event = [\"subscribe\", \"SCAN\"]", "event = []")]),
            "routes[0].match.event",
            "must not be empty",
        ),
        (
            "wrong type in a list",
            edit(&[("to = [\"hooks\"]", "to = [\"hooks\", 3]")]),
            "routes[1].to[1]",
            "expected a string",
        ),
        (
            "bad URL",
            edit(&[("http://127.0.0.1:8081/broker", "not a url")]),
            "targets.broker.url",
            "invalid URL",
        ),
        (
            "ftp URL",
            edit(&[("http://127.0.0.1:8081/broker", "ftp://files.example.com/in")]),
            "targets.broker.url",
            "http or https",
        ),
        (
            "json without a secret",
            edit(&[(&secret_line, "")]),
            "targets.hooks.secret",
            "required when format is json",
        ),
        (
            "secret on a raw target",
            edit(&[(
                "retry = \"login\"",
                &format!("retry = \"login\"\nsecret = \"{WEBHOOK_SECRET}\""),
            )]),
            "targets.broker.secret",
            "only used with format = \"json\"",
        ),
        (
            "secret without whsec_",
            edit(&[("whsec_", "")]),
            "targets.hooks.secret",
            "must start with \"whsec_\"",
        ),
        (
            "secret too short",
            edit(&[(&WEBHOOK_SECRET[6..], "c2hvcnQ=")]),
            "targets.hooks.secret",
            "24 to 64 bytes, got 5",
        ),
        (
            "unknown format",
            edit(&[("format = \"json\"", "format = \"xml\"")]),
            "targets.hooks.format",
            "unknown format \"xml\"",
        ),
        (
            "unknown retry class",
            edit(&[("retry = \"login\"", "retry = \"forever\"")]),
            "targets.broker.retry",
            "unknown retry class",
        ),
        (
            "bad retry delay",
            edit(&[("retry = \"login\"", "retry_schedule = [\"1s\", \"soon\"]")]),
            "targets.broker.retry_schedule[1]",
            "invalid duration \"soon\"",
        ),
        (
            "zero concurrency",
            edit(&[("retry = \"login\"", "concurrency = 0")]),
            "targets.broker.concurrency",
            "between 1 and 1024",
        ),
        (
            "negative breaker failures",
            edit(&[("retry = \"login\"", "breaker = { failures = -1 }")]),
            "targets.broker.breaker.failures",
            "between 0 (never opens) and 100000",
        ),
        (
            "bad breaker backoff",
            edit(&[("retry = \"login\"", "breaker = { backoff = \"soon\" }")]),
            "targets.broker.breaker.backoff",
            "invalid duration \"soon\"",
        ),
        (
            "breaker cap below its backoff",
            edit(&[(
                "retry = \"login\"",
                "breaker = { backoff = \"10s\", max_backoff = \"5s\" }",
            )]),
            "targets.broker.breaker.max_backoff",
            "must not be less than backoff",
        ),
        (
            "unknown breaker key",
            edit(&[("retry = \"login\"", "breaker = { failure = 3 }")]),
            "targets.broker.breaker",
            "unknown field",
        ),
        (
            "zero max_age",
            edit(&[("retry = \"login\"", "max_age = \"0s\"")]),
            "targets.broker.max_age",
            "greater than zero",
        ),
        (
            "unknown ordering",
            edit(&[("retry = \"login\"", "ordering = \"per_account\"")]),
            "targets.broker.ordering",
            "unknown ordering \"per_account\": expected one of unordered, per_user",
        ),
        (
            "zero timeout",
            edit(&[("retry = \"login\"", "timeout = \"0s\"")]),
            "targets.broker.timeout",
            "greater than zero",
        ),
        (
            "reply_budget of 5s",
            format!("[server]\nreply_budget = \"5s\"\n{VALID}"),
            "server.reply_budget",
            "less than 5s",
        ),
        (
            "zero reply_budget",
            format!("[server]\nreply_budget = \"0s\"\n{VALID}"),
            "server.reply_budget",
            "greater than zero",
        ),
        (
            "listen == admin_listen",
            format!(
                "[server]\nlisten = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n{VALID}"
            ),
            "server.admin_listen",
            "must differ from server.listen",
        ),
        (
            "admin on the public socket",
            format!(
                "[server]\nlisten = \"0.0.0.0:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n{VALID}"
            ),
            "server.admin_listen",
            "must differ",
        ),
        (
            "bad address",
            format!("[server]\nlisten = \"localhost\"\n{VALID}"),
            "server.listen",
            "IP address and port",
        ),
        (
            "bad size",
            format!("[server]\nmax_body = \"12 parsecs\"\n{VALID}"),
            "server.max_body",
            "invalid size \"12 parsecs\"",
        ),
        (
            "size out of range",
            format!("[server]\nmax_body = \"32MiB\"\n{VALID}"),
            "server.max_body",
            "between 1KiB and 16MiB",
        ),
        (
            "no connections",
            format!("[server]\nmax_connections = 0\n{VALID}"),
            "server.max_connections",
            "between 1 and 1000000",
        ),
        (
            "body budget below one body",
            format!(
                "[server]\nmax_body = \"64KiB\"\nmax_body_bytes_in_flight = \"32KiB\"\n{VALID}"
            ),
            "server.max_body_bytes_in_flight",
            "at least server.max_body",
        ),
        (
            "body budget too large",
            format!("[server]\nmax_body_bytes_in_flight = \"2048MiB\"\n{VALID}"),
            "server.max_body_bytes_in_flight",
            "at most 1GiB",
        ),
        (
            "zero dedup_window",
            format!("[spool]\ndedup_window = \"0s\"\n{VALID}"),
            "spool.dedup_window",
            "greater than zero",
        ),
        (
            "dedup_window shorter than a timestamp_window",
            format!("[spool]\ndedup_window = \"299s\"\n{VALID}"),
            "spool.dedup_window",
            "must be at least accounts.main.timestamp_window (5m)",
        ),
        (
            "no accounts",
            "[targets.t]\nurl = \"http://localhost/\"\n".to_owned(),
            "accounts",
            "no accounts configured",
        ),
        (
            "unknown spool backend",
            format!("[spool]\nbackend = \"redis\"\n{VALID}"),
            "spool.backend",
            "unknown backend \"redis\": expected \"sqlite\" or \"postgres\"",
        ),
        (
            "postgres without a url",
            format!("[spool]\nbackend = \"postgres\"\n{VALID}"),
            "spool.url",
            "required with backend = \"postgres\": set url, url_file or WXRELAY_SPOOL__URL",
        ),
        (
            "postgres with a bad url",
            format!("[spool]\nbackend = \"postgres\"\nurl = \"postgres://relay@db:port/relay\"\n{VALID}"),
            "spool.url",
            "not a PostgreSQL connection string",
        ),
        (
            "postgres with sslmode in the url",
            format!("[spool]\nbackend = \"postgres\"\nurl = \"postgres://relay@db/relay?sslmode=require\"\n{VALID}"),
            "spool.url",
            "set spool.sslmode instead",
        ),
        (
            "postgres with a url and a url_file",
            format!("{PG}url_file = \"/run/secrets/db\"\n{VALID}"),
            "spool.url_file",
            "set url or url_file, not both",
        ),
        (
            "postgres with the sqlite path",
            format!("{PG}path = \"./data/spool.db\"\n{VALID}"),
            "spool.path",
            "only for backend = \"sqlite\"",
        ),
        (
            "sqlite with a postgres key",
            format!("[spool]\nschema = \"relay\"\n{VALID}"),
            "spool.schema",
            "only for backend = \"postgres\"",
        ),
        (
            "an unescaped @ in the password",
            format!("[spool]\nbackend = \"postgres\"\nurl = \"postgres://relay:Tr0ub@dor-SECRET@db:5432/relay\"\n{VALID}"),
            "spool.url",
            "write an '@' in the password as %40",
        ),
        (
            "unknown sslmode",
            format!("{PG}sslmode = \"prefer\"\n{VALID}"),
            "spool.sslmode",
            "unknown sslmode \"prefer\": expected one of disable, require, verify-ca, verify-full",
        ),
        (
            "a schema that is no plain identifier",
            format!("{PG}schema = \"Relay; DROP\"\n{VALID}"),
            "spool.schema",
            "not a plain identifier",
        ),
        (
            "pool_size too small",
            format!("{PG}pool_size = 1\n{VALID}"),
            "spool.pool_size",
            "must be between 2 and 256, got 1",
        ),
        (
            "ca_file without TLS",
            format!("{PG}ca_file = \"/etc/ssl/db.pem\"\n{VALID}"),
            "spool.ca_file",
            "needs sslmode = \"verify-ca\" or \"verify-full\"",
        ),
        (
            "unreadable ca_file",
            format!("{PG}sslmode = \"verify-full\"\nca_file = \"/nonexistent/db.pem\"\n{VALID}"),
            "spool.ca_file",
            "cannot read /nonexistent/db.pem",
        ),
    ];

    // One problem each: a mistake is reported once, where it was made, not
    // again by every check that depends on it.
    for (name, toml, path, fragment) in &cases {
        let err = Settings::from_toml_str(toml)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted:\n{toml}"));
        assert_eq!(err.problems.len(), 1, "{name}:\n{err}");
        let problem = &err.problems[0];
        assert!(
            problem.path == *path && problem.message.contains(fragment),
            "{name}: expected `{path}: …{fragment}…`, got:\n{err}"
        );
    }
}

/// A target that gets WeChat's query appended to its URL must not carry one
/// of its parameters already (the target would read one of two, and maybe
/// not the one signed), and no target URL may have a `#fragment` (the
/// query would be appended inside it and never sent).
#[test]
fn a_target_url_with_a_fragment_or_wechats_parameters_is_refused() {
    let broker = line("url");
    let mut cases = vec![("http://127.0.0.1:8081/broker#events".to_owned(), "fragment")];
    for name in [
        "signature",
        "timestamp",
        "nonce",
        "msg_signature",
        "encrypt_type",
        "echostr",
        "openid",
    ] {
        cases.push((
            format!("http://127.0.0.1:8081/broker?tenant=7&{name}=x"),
            name,
        ));
    }
    // Read as the target reads it: percent-decoded.
    cases.push((
        "http://127.0.0.1:8081/broker?%74imestamp=1".to_owned(),
        "timestamp",
    ));
    for format in ["raw", "plain", "wechat"] {
        for (url, named) in &cases {
            let mut edits = vec![(
                broker.as_str(),
                format!("url = \"{url}\"\nformat = \"{format}\""),
            )];
            if format == "wechat" {
                edits.push((
                    "retry = \"login\"",
                    format!("retry = \"login\"\nmode = \"plaintext\"\ntoken = \"{TOKEN}\""),
                ));
            }
            let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
            let err = Settings::from_toml_str(&edit(&edits))
                .err()
                .unwrap_or_else(|| panic!("{format} {url}: accepted"));
            assert_eq!(err.problems.len(), 1, "{format} {url}:\n{err}");
            assert_has(&err, "targets.broker.url", named);
        }
    }
    // A json target is sent no query of WeChat's: only the fragment matters.
    let hooks = "url = \"https://hooks.example.com/events\"";
    let with_nonce = edit(&[(hooks, "url = \"https://hooks.example.com/events?nonce=1\"")]);
    assert!(Settings::from_toml_str(&with_nonce).is_ok());
    let with_fragment = edit(&[(hooks, "url = \"https://hooks.example.com/events#x\"")]);
    let err = Settings::from_toml_str(&with_fragment).unwrap_err();
    assert_has(&err, "targets.hooks.url", "fragment");
    // Other parameters are the target's own, and kept.
    let tenant = edit(&[(
        broker.as_str(),
        "url = \"http://127.0.0.1:8081/broker?tenant=7\"",
    )]);
    assert!(Settings::from_toml_str(&tenant).is_ok());
}

/// An admin listener reachable from other hosts would let anyone reload the
/// configuration: it needs a token, or an explicit allowance.
#[test]
fn a_non_loopback_admin_listener_needs_a_token_or_an_explicit_allowance() {
    for admin in ["0.0.0.0:9090", "10.1.2.3:9090", "[::]:9090"] {
        let toml = format!("[server]\nadmin_listen = \"{admin}\"\n{VALID}");
        let err = Settings::from_toml_str(&toml)
            .err()
            .unwrap_or_else(|| panic!("{admin}: accepted without a token"));
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_has(&err, "server.admin_token", "required when admin_listen");
        assert_has(&err, "server.admin_token", "allow_unauthenticated_admin");

        let with_token = format!(
            "[server]\nadmin_listen = \"{admin}\"\nadmin_token = \"a-long-admin-token\"\n{VALID}"
        );
        Settings::from_toml_str(&with_token).unwrap_or_else(|e| panic!("{admin}: {e}"));

        let allowed = format!(
            "[server]\nadmin_listen = \"{admin}\"\nallow_unauthenticated_admin = true\n{VALID}"
        );
        let settings = Settings::from_toml_str(&allowed).unwrap_or_else(|e| panic!("{admin}: {e}"));
        assert!(settings.server.allow_unauthenticated_admin);
    }
    // Loopback needs neither, as before.
    for admin in ["127.0.0.1:9090", "127.0.0.2:9090", "[::1]:9090"] {
        let toml = format!("[server]\nadmin_listen = \"{admin}\"\n{VALID}");
        let settings = Settings::from_toml_str(&toml).unwrap_or_else(|e| panic!("{admin}: {e}"));
        assert!(!settings.server.allow_unauthenticated_admin);
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let toml = edit(&[
        (AES_KEY, "short"),
        ("to = [\"hooks\"]", "to = [\"crm\"]"),
        (
            "url = \"http://127.0.0.1:8081/broker\"",
            "url = \"ftp://x\"",
        ),
        ("\"secure\"", "\"sekure\""),
    ]);
    let err =
        Settings::from_toml_str(&format!("[server]\nreply_budget = \"9s\"\n{toml}")).unwrap_err();
    for path in [
        "server.reply_budget",
        "accounts.main.encoding_aes_key",
        "accounts.main.mode",
        "targets.broker.url",
        "routes[1].to",
    ] {
        assert!(
            err.problems.iter().any(|p| p.path == path),
            "{path} missing from:\n{err}"
        );
    }
    assert_eq!(err.to_string().lines().count(), err.problems.len());
}

#[test]
fn timestamp_window_zero_turns_the_check_off() {
    let settings = Settings::from_toml_str(&edit(&[(
        "mode = \"secure\"",
        "mode = \"secure\"\ntimestamp_window = \"0s\"",
    )]))
    .unwrap();
    assert_eq!(settings.accounts["main"].timestamp_window, None);
}

#[test]
fn a_plaintext_account_needs_no_key() {
    let settings = Settings::from_toml_str(&edit(&[
        (&line("encoding_aes_key"), ""),
        ("\"secure\"", "\"plaintext\""),
    ]))
    .unwrap();
    assert_eq!(settings.accounts["main"].mode, Mode::Plaintext);
    assert!(settings.accounts["main"].keys.is_none());
}

#[test]
fn defaults_apply() {
    let settings = Settings::from_toml_str(VALID).unwrap();
    let server = &settings.server;
    assert_eq!(server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(server.max_body, 256 * 1024);
    assert!((16..=4096).contains(&server.max_connections));
    assert_eq!(server.max_body_bytes_in_flight, 32 * 1024 * 1024);
    assert_eq!(server.reply_budget, Duration::from_secs(4));
    assert_eq!(server.header_timeout, Duration::from_secs(10));
    assert_eq!(server.shutdown_timeout, Duration::from_secs(10));
    assert!(server.admin_token.is_none());
    assert_eq!(settings.spool.dedup_window, Duration::from_secs(600));
    let hooks = &settings.targets["hooks"];
    assert_eq!(hooks.retry.class, RetryClass::Durable);
    assert_eq!(hooks.retry.delays.len(), 10);
    assert_eq!(hooks.timeout, Duration::from_secs(5));
    assert_eq!(hooks.concurrency, 8);
    assert_eq!(hooks.max_age, None, "durable events are sent however late");
    assert_eq!(hooks.ordering, Ordering::Unordered);
    assert_eq!(hooks.breaker, RetryClass::Durable.default_breaker());
    let broker = &settings.targets["broker"];
    assert_eq!(broker.max_age, Some(Duration::from_secs(600)));
    assert_eq!(broker.breaker, RetryClass::Login.default_breaker());
    assert_eq!(
        settings.telemetry.otlp_endpoint, None,
        "no traces by default"
    );
    assert_eq!(settings.telemetry.service_name, "wxrelay");
}

#[test]
fn a_collector_is_an_http_base_url_named_at_its_key() {
    let with = |section: &str| Settings::from_toml_str(&format!("{VALID}\n[telemetry]\n{section}"));
    let settings =
        with("otlp_endpoint = \"http://collector:4318\"\nservice_name = \"relay-eu\"").unwrap();
    let endpoint = settings
        .telemetry
        .otlp_endpoint
        .as_ref()
        .map(|u| u.as_str());
    assert_eq!(endpoint, Some("http://collector:4318/"));
    assert_eq!(settings.telemetry.service_name, "relay-eu");
    for (endpoint, fragment) in [
        ("collector:4318", "http or https"),
        ("grpc://collector:4317", "http or https"),
        ("http://", "invalid URL"),
        ("http://collector:4318/?tenant=1", "query"),
        ("http://collector:4318/#x", "fragment"),
        ("https://user:pass@collector:4318", "credentials"),
    ] {
        let err = with(&format!("otlp_endpoint = \"{endpoint}\"")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{endpoint}:\n{err}");
        assert_has(&err, "telemetry.otlp_endpoint", fragment);
        assert!(!err.to_string().contains("pass@"), "{err}");
    }
    let report = render_check(&settings);
    assert!(
        report.contains("otlp_endpoint     http://collector:4318/"),
        "{report}"
    );
    let off = render_check(&Settings::from_toml_str(VALID).unwrap());
    assert!(!off.contains("telemetry"), "{off}");
    let err = with("service_name = \" \"").unwrap_err();
    assert_has(&err, "telemetry.service_name", "not empty");
    let err = with("endpoint = \"http://collector:4318\"").unwrap_err();
    assert!(err.to_string().contains("endpoint"), "{err}");
}

#[test]
fn a_breaker_takes_what_the_file_sets_and_the_class_default_for_the_rest() {
    let toml = edit(&[(
        "retry = \"login\"",
        "retry = \"login\"\nbreaker = { failures = 0, max_backoff = \"1m\" }\nmax_age = \"off\"\nordering = \"per_user\"",
    )]);
    let broker = &Settings::from_toml_str(&toml).unwrap().targets["broker"];
    let login = RetryClass::Login.default_breaker();
    assert_eq!(
        broker.breaker,
        Breaker {
            failures: 0,
            backoff: login.backoff,
            max_backoff: Duration::from_secs(60),
            retry_after_up_to_max: true,
        }
    );
    assert_eq!(broker.max_age, None);
    assert_eq!(broker.ordering, Ordering::PerUser);
    let report = render_check(&Settings::from_toml_str(&toml).unwrap());
    for expected in [
        "breaker           off",
        "max_age           off",
        "ordering          per_user",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
}

#[test]
fn an_explicit_retry_schedule_replaces_the_class_default() {
    let toml = edit(&[(
        "retry = \"login\"",
        "retry = \"login\"\nretry_schedule = [\"1s\", \"2m\"]",
    )]);
    let retry = &Settings::from_toml_str(&toml).unwrap().targets["broker"].retry;
    assert_eq!(retry.class, RetryClass::Login);
    assert_eq!(
        retry.delays,
        [Duration::from_secs(1), Duration::from_secs(120)]
    );
    assert_eq!(retry.max_attempts(), 3);
}

#[test]
fn token_file_is_read_and_trimmed() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "  {TOKEN}").unwrap();
    let token_file = format!("token_file = '{}'", file.path().display());
    let settings = Settings::from_toml_str(&edit(&[(&line("token"), &token_file)])).unwrap();
    assert_eq!(settings.accounts["main"].token.expose(), TOKEN);
}

#[test]
fn admin_token_file_is_read() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "admin-secret-value").unwrap();
    let toml = format!(
        "[server]\nadmin_token_file = '{}'\n{VALID}",
        file.path().display()
    );
    let settings = Settings::from_toml_str(&toml).unwrap();
    let token = settings.server.admin_token.as_ref().unwrap();
    assert_eq!(token.expose(), "admin-secret-value");
}

#[test]
fn secrets_never_appear_in_debug_or_the_check_report() {
    let toml = format!("[server]\nadmin_token = \"admin-secret-value\"\n{VALID}");
    let toml = toml.replace(
        "url = \"https://hooks.example.com/events\"",
        "url = \"https://user:url-password@hooks.example.com/events\"",
    );
    let settings = Settings::from_toml_str(&toml).unwrap();
    let debug = format!("{settings:?}");
    let report = render_check(&settings);
    for secret in [
        TOKEN,
        AES_KEY,
        WEBHOOK_SECRET,
        &WEBHOOK_SECRET[6..],
        "admin-secret-value",
    ] {
        assert!(!debug.contains(secret), "Debug shows {secret}");
        assert!(!report.contains(secret), "check shows {secret}:\n{report}");
    }
    assert!(!report.contains("url-password"), "{report}");
    assert!(report.contains("***"));
}

#[test]
fn errors_never_quote_a_secret() {
    let toml = edit(&[
        (TOKEN, "Relay2024Token!"),
        (AES_KEY, &format!("{AES_KEY}Z")),
    ]);
    let err = Settings::from_toml_str(&toml).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("Relay2024Token"), "{text}");
    assert!(!text.contains(AES_KEY), "{text}");
}

#[test]
fn the_check_report_shows_what_the_relay_will_do() {
    let settings = Settings::from_toml_str(VALID).unwrap();
    let report = render_check(&settings);
    let fingerprint = settings.accounts["main"]
        .keys
        .as_ref()
        .unwrap()
        .current
        .fingerprint();
    for expected in [
        "max_body          256KiB",
        "account main at /wx/main",
        "wx5f3c9a1e7d2b4c60",
        "secure",
        &fingerprint,
        "http://127.0.0.1:8081/broker",
        "login: 9 attempts over 2m",
        "max_age           10m",
        "opens after 5 failures in a row; probes after 1s, up to every 5s",
        "[0] event=subscribe|SCAN -> broker (replies), hooks",
        "[1] * -> hooks",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    assert!(!report.contains("warnings"), "{report}");
}

#[test]
fn the_check_report_warns_about_unrouted_events() {
    let without_routes = VALID.split("[[routes]]").next().unwrap();
    let report = render_check(&Settings::from_toml_str(without_routes).unwrap());
    assert!(
        report.contains("no routes: every event will be dead-lettered as `unrouted`"),
        "{report}"
    );

    let without_catch_all = edit(&[(CATCH_ALL, "")]);
    let report = render_check(&Settings::from_toml_str(&without_catch_all).unwrap());
    assert!(report.contains("no catch-all rule"), "{report}");
}

#[test]
fn the_check_report_warns_that_an_ordered_reply_target_answers_out_of_order() {
    let warning = "target \"broker\" is a reply_from with ordering = \"per_user\": \
                   its inline reply attempt is not held back by the user's earlier deliveries";
    let ordered = edit(&[(
        "retry = \"login\"",
        "retry = \"login\"\nordering = \"per_user\"",
    )]);
    let report = render_check(&Settings::from_toml_str(&ordered).unwrap());
    assert!(report.contains(warning), "{report}");

    // Ordered, but not a reply target: nothing to warn about.
    let not_replying = edit(&[
        ("reply_from = \"broker\"\n", ""),
        (
            "url = \"http://127.0.0.1:8081/broker\"",
            "url = \"http://127.0.0.1:8081/broker\"\nordering = \"per_user\"",
        ),
    ]);
    let report = render_check(&Settings::from_toml_str(&not_replying).unwrap());
    assert!(!report.contains("warnings"), "{report}");
}

/// `sslmode` takes libpq's values; `require` without a CA verifies nothing,
/// which `check` says.
#[test]
fn the_check_report_warns_that_sslmode_require_verifies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, "not read by check beyond being there").unwrap();
    let ca = format!("ca_file = \"{}\"\n", ca_file.display());
    let warning = "spool.sslmode = \"require\" encrypts but verifies nothing";
    for (tls, warned) in [
        ("sslmode = \"require\"\n".to_owned(), true),
        (format!("sslmode = \"require\"\n{ca}"), false),
        (format!("sslmode = \"verify-ca\"\n{ca}"), false),
        ("sslmode = \"verify-ca\"\n".to_owned(), false),
        ("sslmode = \"verify-full\"\n".to_owned(), false),
    ] {
        let settings = Settings::from_toml_str(&format!("{PG}{tls}{VALID}"))
            .unwrap_or_else(|e| panic!("{tls}: {e}"));
        let report = render_check(&settings);
        assert_eq!(report.contains(warning), warned, "{tls}: {report}");
    }
}

/// The setting a `WXRELAY_` variable (named without the prefix) overrides:
/// `SPOOL__URL` is `spool.url`.
fn setting_of(variable: &str) -> String {
    variable
        .split("__")
        .collect::<Vec<_>>()
        .join(".")
        .to_lowercase()
}

/// A test value for a setting a deployment takes from a Secret.
fn stand_in(key: &str) -> String {
    match key.rsplit('.').next().unwrap() {
        "token" => TOKEN.to_owned(),
        "encoding_aes_key" => AES_KEY.to_owned(),
        "secret" => WEBHOOK_SECRET.to_owned(),
        "admin_token" => "a-long-random-admin-token".to_owned(),
        "url" => "postgres://wxrelay:a-password@db.example.internal:5432/wxrelay".to_owned(),
        other => panic!("no test value for {other}"),
    }
}

/// The relay.toml inside the ConfigMap `configmap` (under `deploy/`), with
/// the `WXRELAY_` environment the `workload` sets (its Secrets' values stood
/// in for by test values), and the keys that came from Secrets.
fn deployed(configmap: &str, workload: &str) -> (Settings, Vec<String>) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let yaml = std::fs::read_to_string(deploy.join(configmap)).unwrap();
    let body: String = yaml
        .split_once("relay.toml: |\n")
        .unwrap()
        .1
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    use figment::providers::Format as _;
    let mut figment = figment::Figment::from(figment::providers::Toml::string(&body));
    let workload = std::fs::read_to_string(deploy.join(workload)).unwrap();
    let lines: Vec<&str> = workload.lines().map(str::trim).collect();
    let mut from_secret = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // As the relay reads them: a variable without `__` (the log
        // filter) is not a config key.
        let Some(name) = line
            .strip_prefix("- name: WXRELAY_")
            .filter(|name| name.contains("__"))
        else {
            continue;
        };
        let key = setting_of(name);
        let value = match lines[i + 1].strip_prefix("value: ") {
            Some(value) => value.trim_matches('"').to_owned(),
            None => {
                assert_eq!(lines[i + 1], "valueFrom:", "{name}");
                from_secret.push(key.clone());
                stand_in(&key)
            }
        };
        figment = figment.merge((key, value));
    }
    let settings = Settings::from_figment(figment).unwrap_or_else(|e| panic!("{e}"));
    (settings, from_secret)
}

/// Every deploy file that sets the log filter sets the variable the relay
/// reads: a `RUST_LOG` (or any other `…_LOG`) is silently ignored.
#[test]
fn the_deploy_files_set_the_log_filter_the_relay_reads() {
    let relay_reads = wxrelay::config::LOG_FILTER_ENV;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut dirs = vec![deploy.clone()];
    let mut wrong = Vec::new();
    let mut setters = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let name = path.strip_prefix(&deploy).unwrap().display().to_string();
            let words = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            for word in words.filter(|w| w.ends_with("_LOG") && w.len() > 4) {
                if word == relay_reads {
                    setters.push(name.clone());
                } else {
                    wrong.push(format!("{name}: {word}"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "variables the relay does not read: {wrong:?}"
    );
    for file in ["kubernetes/statefulset.yaml", "systemd/wxrelay.service"] {
        assert!(
            setters.iter().any(|s| s == file),
            "{file} sets no {relay_reads}: {setters:?}"
        );
    }
}

/// The relay.toml inside the Kubernetes ConfigMap, with the environment the
/// StatefulSet sets (its Secret's values stood in for by test values), is a
/// configuration the relay accepts.
#[test]
fn the_kubernetes_configmap_is_a_valid_configuration() {
    let (settings, from_secret) =
        deployed("kubernetes/configmap.yaml", "kubernetes/statefulset.yaml");
    assert!(
        from_secret.iter().any(|k| k == "server.admin_token"),
        "the admin token comes from the Secret: {from_secret:?}"
    );
    assert_eq!(settings.server.admin_listen.to_string(), "0.0.0.0:9090");
    assert!(settings.server.admin_token.is_some());
    assert!(matches!(
        settings.spool.backend,
        SpoolBackend::Sqlite { .. }
    ));
    assert_eq!(settings.accounts["main"].mode, Mode::Secure);
    assert_eq!(settings.targets["webhooks"].format, Format::Json);
    assert_eq!(settings.routes.len(), 2);
}

/// The same for the Deployment of several replicas on PostgreSQL, and for
/// the Job that migrates its schema ahead of a rollout: the database URL
/// comes from a Secret, never from the ConfigMap.
#[test]
fn the_kubernetes_postgres_deployment_is_a_valid_configuration() {
    let configmap = "kubernetes/postgres/configmap.yaml";
    for workload in ["deployment.yaml", "migrate-job.yaml"] {
        let workload = format!("kubernetes/postgres/{workload}");
        let (settings, from_secret) = deployed(configmap, &workload);
        assert!(
            from_secret.iter().any(|k| k == "spool.url"),
            "{workload}: the database URL comes from a Secret: {from_secret:?}"
        );
        let SpoolBackend::Postgres(postgres) = &settings.spool.backend else {
            panic!("{workload}: not on PostgreSQL");
        };
        assert_eq!(postgres.schema, "wxrelay");
        assert_eq!(postgres.sslmode, SslMode::VerifyFull);
        assert!(
            !postgres.display.contains("a-password"),
            "{}",
            postgres.display
        );
        assert_eq!(settings.routes.len(), 2);
    }
}

/// The compose file's replicas run `compose/relay.toml` with the environment
/// it sets them (its `${…}` secrets stood in for by test values).
#[test]
fn the_compose_replicas_have_a_valid_configuration() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose");
    let toml = std::fs::read_to_string(deploy.join("relay.toml")).unwrap();
    use figment::providers::Format as _;
    let mut figment = figment::Figment::from(figment::providers::Toml::string(&toml));
    let compose = std::fs::read_to_string(deploy.join("docker-compose.yml")).unwrap();
    let mut keys = Vec::new();
    for line in compose.lines().map(str::trim) {
        let Some((name, value)) = line
            .strip_prefix("WXRELAY_")
            .and_then(|l| l.split_once(": "))
        else {
            continue;
        };
        let key = setting_of(name);
        let value = value.trim_matches('"');
        let value = match value.split_once("${") {
            None => value.to_owned(),
            // A password inside the URL.
            Some((before, rest)) if key == "spool.url" => {
                format!("{before}a-password{}", rest.split_once('}').unwrap().1)
            }
            Some(_) => stand_in(&key),
        };
        keys.push(key.clone());
        figment = figment.merge((key, value));
    }
    assert!(keys.iter().any(|k| k == "spool.url"), "{keys:?}");
    let settings = Settings::from_figment(figment).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(settings.spool.backend, SpoolBackend::Postgres(_)));
    assert_eq!(settings.server.listen.to_string(), "0.0.0.0:8080");
    assert!(settings.server.admin_token.is_some());
}

#[test]
fn a_postgres_spool_is_configured_with_its_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("db-url");
    std::fs::write(&url_file, "postgres://relay:pw@db.internal/relay\n").unwrap();
    let toml = format!(
        "[spool]\nbackend = \"postgres\"\nurl_file = \"{}\"\n{VALID}",
        url_file.display()
    );
    let settings = Settings::from_toml_str(&toml).unwrap();
    let SpoolBackend::Postgres(pg) = &settings.spool.backend else {
        panic!("{:?}", settings.spool.backend)
    };
    assert_eq!(pg.url.expose(), "postgres://relay:pw@db.internal/relay");
    assert_eq!(pg.display, "postgres://relay@db.internal:5432/relay");
    assert_eq!(
        (pg.schema.as_str(), pg.pool_size, pg.sslmode),
        ("wxrelay", 8, SslMode::Disable)
    );
    let report = render_check(&settings);
    assert!(report.contains("backend           postgres"), "{report}");
    assert!(!report.contains(":pw@"), "{report}");
    assert!(!format!("{settings:?}").contains(":pw@"));
}

/// `late_reply` needs a `reply_from` whose timeout is at most 120 s, and
/// `customer_service` the API of every account the rule can match;
/// `[accounts.X.api]` needs its secret (or a token service). Each problem is
/// named at its key; the secret is never printed.
#[test]
fn late_replies_are_checked_at_their_keys_and_the_secret_is_never_shown() {
    let api = "\n[accounts.main.api]\napp_secret = \"very-secret-app-secret\"\n";
    let late = |value: &str| {
        edit(&[(
            "reply_from = \"broker\"",
            &format!("reply_from = \"broker\"\nlate_reply = \"{value}\""),
        )])
    };
    let settings = Settings::from_toml_str(&format!("{}{api}", late("customer_service"))).unwrap();
    let report = render_check(&settings);
    assert!(report.contains("late: customer_service"), "{report}");
    assert!(
        report.contains("token_source      stable_token"),
        "{report}"
    );
    assert!(report.contains("app_secret        ***"), "{report}");
    assert!(!report.contains("very-secret"), "{report}");
    assert!(!format!("{settings:?}").contains("very-secret"));
    let next = Settings::from_toml_str(&late("next_message")).unwrap();
    assert!(render_check(&next).contains("late: next_message within 2days"));

    let err = Settings::from_toml_str(&late("customer_service")).unwrap_err();
    assert_has(&err, "routes[0].late_reply", "missing for: main");
    assert_has(&err, "routes[0].late_reply", "next_message");
    let err = Settings::from_toml_str(&late("later")).unwrap_err();
    assert_has(&err, "routes[0].late_reply", "customer_service");
    let no_reply_from = edit(&[(
        "to = [\"hooks\"]\n",
        "to = [\"hooks\"]\nlate_reply = \"next_message\"\n",
    )]);
    let err = Settings::from_toml_str(&no_reply_from).unwrap_err();
    assert_has(&err, "routes[1].late_reply", "needs reply_from");
    let slow = late("next_message").replace("retry = \"login\"", "timeout = \"121s\"");
    let err = Settings::from_toml_str(&slow).unwrap_err();
    assert_has(&err, "targets.broker.timeout", "at most 120s");
    let err = Settings::from_toml_str(&format!("{VALID}\n[accounts.main.api]\n")).unwrap_err();
    assert_has(&err, "accounts.main.api.app_secret", "required");
    let url = "\n[accounts.main.api]\ntoken_source = \"url\"\n";
    let err = Settings::from_toml_str(&format!("{VALID}{url}")).unwrap_err();
    assert_has(&err, "accounts.main.api.token_url", "required");
    let bad = format!("{VALID}{url}token_url = \"ftp://x\"\n");
    assert_has(
        &Settings::from_toml_str(&bad).unwrap_err(),
        "accounts.main.api.token_url",
        "http",
    );
    let wecom = format!("{VALID}{api}").replace(
        "[accounts.main]\n",
        "[accounts.main]\nkind = \"wecom\"\ncorp_id = \"wwcorp123\"\n",
    );
    let err = Settings::from_toml_str(&wecom).unwrap_err();
    assert_has(&err, "accounts.main.api", "Official Account");
    let env = format!("{VALID}{api}").replace("app_secret", "app_secret_file");
    let err = Settings::from_toml_str(&env).unwrap_err();
    assert_has(&err, "accounts.main.api.app_secret_file", "cannot read");
}

/// The access token and the secret travel to `api_base` and `token_url`:
/// plain http is taken only for a loopback host (a local token service, a
/// test), and refused at the key otherwise.
#[test]
fn the_api_and_the_token_service_are_reached_over_https_unless_on_loopback() {
    let api = "\n[accounts.main.api]\napp_secret = \"s\"\n";
    let with = |line: &str| format!("{VALID}{api}{line}\n");
    for ok in [
        "api_base = \"https://api.weixin.qq.com\"",
        "api_base = \"http://127.0.0.1:8080\"",
        "api_base = \"http://[::1]:8080\"",
        "api_base = \"http://localhost:8080\"",
    ] {
        assert!(Settings::from_toml_str(&with(ok)).is_ok(), "{ok}");
    }
    let err =
        Settings::from_toml_str(&with("api_base = \"http://api.weixin.qq.com\"")).unwrap_err();
    assert_has(&err, "accounts.main.api.api_base", "https");
    let url = "\n[accounts.main.api]\ntoken_source = \"url\"\n";
    let service = |line: &str| format!("{VALID}{url}{line}\n");
    let err =
        Settings::from_toml_str(&service("token_url = \"http://tokens.internal/t\"")).unwrap_err();
    assert_has(&err, "accounts.main.api.token_url", "https");
    assert!(Settings::from_toml_str(&service("token_url = \"http://127.0.0.1:9/t\"")).is_ok());
    assert!(Settings::from_toml_str(&service("token_url = \"https://tokens.internal/t\"")).is_ok());
}
