//! The templates. maud escapes every value it is given, so text from a push
//! or a target (a response body, an error) can only ever show as text.

pub(super) mod event;
pub(super) mod overview;
pub(super) mod search;

use crate::spool::UnixMs;
use maud::{html, Markup, DOCTYPE};

/// The one stylesheet, served at `/ui/style.css`: a `<style>` element would
/// need the policy to allow inline styles.
pub(super) const STYLE: &str = include_str!("style.css");

/// What the header needs to offer signing out: the session's CSRF token,
/// when there is a session and a token to sign in with again.
#[derive(Clone, Copy)]
pub(super) struct Chrome<'a> {
    pub csrf: Option<&'a str>,
    pub guarded: bool,
}

/// Every page: the header with the navigation, then `body`.
pub(super) fn layout(title: &str, chrome: Chrome<'_>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · wxrelay" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                header.top {
                    a.brand href="/ui" { "wxrelay" }
                    @if let Some(csrf) = chrome.csrf {
                        nav {
                            a href="/ui" { "Overview" }
                            a href="/ui/search" { "Search" }
                        }
                        @if chrome.guarded {
                            form.signout method="post" action="/ui/signout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The sign-in form, with why the last try failed.
pub(super) fn signin(problem: Option<&str>) -> Markup {
    let chrome = Chrome {
        csrf: None,
        guarded: true,
    };
    layout(
        "Sign in",
        chrome,
        html! {
            section.card.narrow {
                h1 { "Sign in" }
                @if let Some(problem) = problem { p.problem { (problem) } }
                form method="post" action="/ui/signin" {
                    label for="token" { "Admin token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
                p.hint { "The token is the server's " code { "admin_token" } "." }
            }
        },
    )
}

/// A refused request's page: the reason, and the way on.
pub(super) fn refused(reason: &str, signed_in: bool) -> Markup {
    let chrome = Chrome {
        csrf: None,
        guarded: true,
    };
    layout(
        "Refused",
        chrome,
        html! {
            section.card.narrow {
                h1 { "Refused" }
                p.problem { (reason) }
                @if signed_in { p { a href="/ui" { "Back to the overview" } } }
                @else { p { a href="/ui/signin" { "Sign in" } } }
            }
        },
    )
}

/// A page the spool could not serve now.
pub(super) fn failure(reason: &str) -> Markup {
    let chrome = Chrome {
        csrf: None,
        guarded: false,
    };
    layout(
        "Unavailable",
        chrome,
        html! {
            section.card.narrow {
                h1 { "Unavailable" }
                p.problem { (reason) }
                p { a href="/ui" { "Try again" } }
            }
        },
    )
}

/// A time as the pages show it: UTC, to the second.
pub(super) fn when(t: UnixMs) -> String {
    let text = humantime::format_rfc3339_seconds(t.to_system_time()).to_string();
    text.replacen('T', " ", 1)
}

/// A span of milliseconds, in the unit that reads best.
pub(super) fn span(ms: i64) -> String {
    match ms.max(0) {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms if ms < 7_200_000 => format!("{} min", ms / 60_000),
        ms => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

/// A form that posts one action with the session's CSRF token and the
/// fields given, as a single button.
pub(super) fn action(path: &str, csrf: &str, fields: &[(&str, String)], label: &str) -> Markup {
    html! {
        form.inline method="post" action=(path) {
            input type="hidden" name="csrf" value=(csrf);
            @for (name, value) in fields {
                input type="hidden" name=(name) value=(value);
            }
            button type="submit" { (label) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_spans_read_plainly() {
        assert_eq!(when(UnixMs(1_765_101_720_000)), "2025-12-07 10:02:00Z");
        assert_eq!(span(250), "250 ms");
        assert_eq!(span(1_500), "1.5 s");
        assert_eq!(span(600_000), "10 min");
        assert_eq!(span(9_000_000), "2.5 h");
    }

    #[test]
    fn markup_escapes_what_a_target_sent() {
        let page = action("/ui/replay", "t\"ok", &[("back", "<script>".into())], "<b>");
        let page = page.into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;") && page.contains("&quot;"));
    }
}
