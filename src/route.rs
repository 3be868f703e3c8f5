//! Routing: which targets get a push, and which of them may answer WeChat.
//!
//! Rules are tried in order and the first whose [`Match`] holds decides, so
//! the table reads top to bottom. A match is a conjunction of optional keys;
//! each key lists alternatives. `msg_type`, `event` and `info_type` compare
//! ignoring ASCII case, because WeChat writes `subscribe` but `SCAN`; every
//! other key compares exactly. Besides the message's fields, a rule can ask
//! for the family's identifiers ([`Identifiers`]): an Open Platform's
//! authoriser (`appid`) and authorisation event (`info_type`), a WeCom app's
//! `agent_id`. A push that matches no rule is the caller's to dead-letter as
//! `unrouted`.
//!
//! Everything here is pure: no I/O, no clock, no config parsing.

use crate::wechat::family::Origin;
use crate::wechat::message::Message;

/// The conditions of one rule. `None` means "any"; a list means "one of".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    pub account: Option<Vec<String>>,
    pub msg_type: Option<Vec<String>>,
    pub event: Option<Vec<String>>,
    pub event_key: Option<Vec<String>>,
    pub event_key_prefix: Option<Vec<String>>,
    pub has_ticket: Option<bool>,
    pub from_user: Option<Vec<String>>,
    /// An Open Platform's authoriser, from its message URL.
    pub appid: Option<Vec<String>>,
    /// A WeCom app's `AgentID`.
    pub agent_id: Option<Vec<String>>,
    /// An Open Platform's authorisation event (`component_verify_ticket`, …).
    pub info_type: Option<Vec<String>>,
}

/// One `[[routes]]` entry, validated: every name in `to` and `reply_from`
/// is a configured target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matcher: Match,
    pub to: Vec<String>,
    /// The target whose answer, if it comes in time and is valid reply XML,
    /// becomes WeChat's answer. Always one of `to`.
    pub reply_from: Option<String>,
    /// What becomes of the reply target's answer when it comes after the
    /// reply budget.
    pub late_reply: LateReply,
    /// How long a `next_message` late reply waits for the user's next push.
    pub late_reply_ttl: std::time::Duration,
}

/// Where a reply target's answer goes when it comes too late for WeChat's
/// answer to the push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LateReply {
    /// Lost, as WeChat has been answered `success`; the inline attempt ends
    /// with the reply budget.
    None,
    /// Sent through the Customer Service API (客服消息).
    CustomerService,
    /// Kept, and given as the passive reply to the user's next push.
    NextMessage,
}

impl LateReply {
    pub const ALL: [LateReply; 3] = [
        LateReply::None,
        LateReply::CustomerService,
        LateReply::NextMessage,
    ];

    /// The name in the file, the spool and the metrics' `channel` label.
    pub fn as_str(self) -> &'static str {
        match self {
            LateReply::None => "none",
            LateReply::CustomerService => "customer_service",
            LateReply::NextMessage => "next_message",
        }
    }
}

/// What a `next_message` late reply waits for the next push by default:
/// WeChat's 48-hour window for answering a user.
pub const DEFAULT_LATE_REPLY_TTL: std::time::Duration = std::time::Duration::from_secs(48 * 3600);

/// What routing looks at: the decrypted push's fields (never the query or
/// plaintext copies, which an attacker could set apart from the ciphertext).
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    pub account: &'a str,
    pub msg_type: &'a str,
    pub event: Option<&'a str>,
    pub event_key: Option<&'a str>,
    pub has_ticket: bool,
    pub from_user: &'a str,
}

/// A push's family identifiers, as a rule may ask for them: what its
/// [`Origin`] verified. An Official Account's push has none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identifiers<'a> {
    pub appid: Option<&'a str>,
    pub agent_id: Option<&'a str>,
    pub info_type: Option<&'a str>,
}

impl<'a> Identifiers<'a> {
    pub fn of(origin: &'a Origin) -> Self {
        Identifiers {
            appid: origin.appid.as_deref(),
            agent_id: origin.agent_id.as_deref(),
            info_type: origin.info_type.as_deref(),
        }
    }
}

/// Everything a rule can ask of a push: its message's keys and its family's
/// identifiers. A bare [`RouteInput`] is a push with no identifiers.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub input: RouteInput<'a>,
    pub ids: Identifiers<'a>,
}

impl<'a> From<&RouteInput<'a>> for Subject<'a> {
    fn from(input: &RouteInput<'a>) -> Self {
        Subject {
            input: *input,
            ids: Identifiers::default(),
        }
    }
}

/// What routing sees of a decrypted push to `account`; the relay and
/// `wxrelay route` both build it here, so the dry run cannot drift from the
/// real path. An empty `Ticket` counts as none.
pub fn route_input<'a>(account: &'a str, message: &'a Message) -> RouteInput<'a> {
    RouteInput {
        account,
        msg_type: message.msg_type().unwrap_or(""),
        event: message.event(),
        event_key: message.event_key(),
        has_ticket: message.ticket().is_some_and(|t| !t.is_empty()),
        from_user: message.from_user().unwrap_or(""),
    }
}

/// [`route_input`] with the identifiers `origin` verified.
pub fn subject<'a>(account: &'a str, message: &'a Message, origin: &'a Origin) -> Subject<'a> {
    Subject {
        input: route_input(account, message),
        ids: Identifiers::of(origin),
    }
}

/// The first rule that matches, with its index for logs and metrics.
pub fn route<'r, 'a>(rules: &'r [Rule], push: impl Into<Subject<'a>>) -> Option<(usize, &'r Rule)> {
    let push = push.into();
    rules
        .iter()
        .enumerate()
        .find(|(_, rule)| rule.matcher.matches(push))
}

impl Match {
    /// Whether every present key holds for `push`. A key that asks about a
    /// field the push lacks (`event` on a text message, `appid` on an
    /// Official Account's push) never holds.
    pub fn matches<'a>(&self, push: impl Into<Subject<'a>>) -> bool {
        let Subject { input, ids } = push.into();
        let (event, key) = (input.event, input.event_key);
        one_of(&self.appid, |s| ids.appid == Some(s))
            && one_of(&self.agent_id, |s| ids.agent_id == Some(s))
            && one_of(&self.info_type, |s| {
                ids.info_type.is_some_and(|t| t.eq_ignore_ascii_case(s))
            })
            && one_of(&self.account, |s| s == input.account)
            && one_of(&self.msg_type, |s| s.eq_ignore_ascii_case(input.msg_type))
            && one_of(&self.event, |s| {
                event.is_some_and(|e| e.eq_ignore_ascii_case(s))
            })
            && one_of(&self.event_key, |s| key == Some(s))
            && one_of(&self.event_key_prefix, |s| {
                key.is_some_and(|k| k.starts_with(s))
            })
            && self.has_ticket.is_none_or(|t| t == input.has_ticket)
            && one_of(&self.from_user, |s| s == input.from_user)
    }

    /// Whether `self` matches every push that `later` matches, so that a rule
    /// with `later` placed after one with `self` can never be reached.
    ///
    /// Conservative: `true` only when each key of `self` is also constrained
    /// by `later` to values inside `self`'s. It may miss an exotic overlap,
    /// never invent one.
    pub fn covers(&self, later: &Match) -> bool {
        let exact = |a: &str, b: &str| a == b;
        let caseless = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let prefixed = |value: &str, prefix: &str| value.starts_with(prefix);
        // `later` is a conjunction: its exact keys or its own prefixes lying
        // inside an earlier prefix is enough on its own.
        let prefix_covered = self.event_key_prefix.is_none()
            || (later.event_key.is_some()
                && within(&self.event_key_prefix, &later.event_key, prefixed))
            || (later.event_key_prefix.is_some()
                && within(&self.event_key_prefix, &later.event_key_prefix, prefixed));
        within(&self.account, &later.account, exact)
            && within(&self.msg_type, &later.msg_type, caseless)
            && within(&self.event, &later.event, caseless)
            && within(&self.event_key, &later.event_key, exact)
            && prefix_covered
            && self.has_ticket.is_none_or(|t| later.has_ticket == Some(t))
            && within(&self.from_user, &later.from_user, exact)
            && within(&self.appid, &later.appid, exact)
            && within(&self.agent_id, &later.agent_id, exact)
            && within(&self.info_type, &later.info_type, caseless)
    }

    /// A one-line summary for `wxrelay check` and logs, e.g.
    /// `event=subscribe|SCAN, has_ticket=true`, or `*` for a catch-all.
    pub fn describe(&self) -> String {
        let lists = [
            ("account", &self.account),
            ("msg_type", &self.msg_type),
            ("event", &self.event),
            ("event_key", &self.event_key),
            ("event_key_prefix", &self.event_key_prefix),
        ];
        let mut parts: Vec<String> = lists
            .iter()
            .filter_map(|(key, values)| values.as_ref().map(|v| format!("{key}={}", v.join("|"))))
            .collect();
        if let Some(t) = self.has_ticket {
            parts.push(format!("has_ticket={t}"));
        }
        if let Some(v) = &self.from_user {
            parts.push(format!("from_user={}", v.join("|")));
        }
        let identifiers = [
            ("appid", &self.appid),
            ("agent_id", &self.agent_id),
            ("info_type", &self.info_type),
        ];
        parts.extend(
            identifiers.iter().filter_map(|(key, values)| {
                values.as_ref().map(|v| format!("{key}={}", v.join("|")))
            }),
        );
        if parts.is_empty() {
            "*".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// Whether this matches every push.
    pub fn is_catch_all(&self) -> bool {
        *self == Match::default()
    }
}

/// An absent key holds; a present one holds if any alternative does.
fn one_of(values: &Option<Vec<String>>, holds: impl Fn(&str) -> bool) -> bool {
    values.as_ref().is_none_or(|v| v.iter().any(|s| holds(s)))
}

/// Whether every value `later` admits for a key is admitted by `earlier`.
fn within(
    earlier: &Option<Vec<String>>,
    later: &Option<Vec<String>>,
    admits: impl Fn(&str, &str) -> bool,
) -> bool {
    match (earlier, later) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(earlier), Some(later)) => later.iter().all(|l| earlier.iter().any(|e| admits(l, e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(values: &[&str]) -> Option<Vec<String>> {
        Some(values.iter().map(|s| s.to_string()).collect())
    }

    fn rule(matcher: Match, to: &str) -> Rule {
        Rule {
            matcher,
            to: vec![to.to_owned()],
            reply_from: None,
            late_reply: LateReply::None,
            late_reply_ttl: DEFAULT_LATE_REPLY_TTL,
        }
    }

    const SCAN: RouteInput<'static> = RouteInput {
        account: "main",
        msg_type: "event",
        event: Some("SCAN"),
        event_key: Some("login_42"),
        has_ticket: true,
        from_user: "oUser1",
    };

    const TEXT: RouteInput<'static> = RouteInput {
        account: "main",
        msg_type: "text",
        event: None,
        event_key: None,
        has_ticket: false,
        from_user: "oUser2",
    };

    #[test]
    fn empty_match_matches_everything() {
        assert!(Match::default().matches(&SCAN));
        assert!(Match::default().matches(&TEXT));
    }

    #[test]
    fn account() {
        let m = Match {
            account: list(&["main", "other"]),
            ..Match::default()
        };
        assert!(m.matches(&SCAN));
        let m = Match {
            account: list(&["other"]),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN));
        let m = Match {
            account: list(&["Main"]),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN), "account ids compare exactly");
    }

    #[test]
    fn msg_type_ignores_case() {
        let m = Match {
            msg_type: list(&["TEXT"]),
            ..Match::default()
        };
        assert!(m.matches(&TEXT));
        assert!(!m.matches(&SCAN));
    }

    #[test]
    fn event_ignores_case_and_needs_an_event() {
        let m = Match {
            event: list(&["subscribe", "scan"]),
            ..Match::default()
        };
        assert!(m.matches(&SCAN));
        assert!(!m.matches(&TEXT), "a message has no Event");
        let m = Match {
            event: list(&["unsubscribe"]),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN));
    }

    #[test]
    fn event_key_is_exact() {
        let m = Match {
            event_key: list(&["login_42"]),
            ..Match::default()
        };
        assert!(m.matches(&SCAN));
        let m = Match {
            event_key: list(&["LOGIN_42", "login_4"]),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN));
        assert!(!m.matches(&TEXT));
    }

    #[test]
    fn event_key_prefix() {
        let m = Match {
            event_key_prefix: list(&["qrscene_", "login_"]),
            ..Match::default()
        };
        assert!(m.matches(&SCAN));
        assert!(!m.matches(&TEXT), "no EventKey, no prefix");
        let m = Match {
            event_key_prefix: list(&["Login_"]),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN));
    }

    #[test]
    fn has_ticket() {
        let m = Match {
            has_ticket: Some(true),
            ..Match::default()
        };
        assert!(m.matches(&SCAN));
        assert!(!m.matches(&TEXT));
        let m = Match {
            has_ticket: Some(false),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN));
        assert!(m.matches(&TEXT));
    }

    #[test]
    fn from_user() {
        let m = Match {
            from_user: list(&["oUser2"]),
            ..Match::default()
        };
        assert!(m.matches(&TEXT));
        assert!(!m.matches(&SCAN));
    }

    #[test]
    fn keys_are_a_conjunction() {
        let m = Match {
            event: list(&["SCAN"]),
            has_ticket: Some(true),
            account: list(&["main"]),
            ..Match::default()
        };
        assert!(m.matches(&SCAN));
        let m = Match {
            event: list(&["SCAN"]),
            has_ticket: Some(false),
            ..Match::default()
        };
        assert!(!m.matches(&SCAN), "one failing key fails the rule");
    }

    #[test]
    fn first_match_wins() {
        let rules = [
            rule(
                Match {
                    msg_type: list(&["text"]),
                    ..Match::default()
                },
                "texts",
            ),
            rule(
                Match {
                    event: list(&["SCAN"]),
                    ..Match::default()
                },
                "broker",
            ),
            rule(Match::default(), "all"),
        ];
        let (index, chosen) = route(&rules, &SCAN).unwrap();
        assert_eq!((index, chosen.to[0].as_str()), (1, "broker"));
        let (index, chosen) = route(&rules, &TEXT).unwrap();
        assert_eq!((index, chosen.to[0].as_str()), (0, "texts"));
    }

    #[test]
    fn no_match_is_none() {
        let rules = [rule(
            Match {
                event: list(&["subscribe"]),
                ..Match::default()
            },
            "broker",
        )];
        assert!(route(&rules, &SCAN).is_none());
        assert!(route(&[], &SCAN).is_none());
    }

    #[test]
    fn catch_all_covers_everything() {
        let narrow = Match {
            event: list(&["SCAN"]),
            has_ticket: Some(true),
            ..Match::default()
        };
        assert!(Match::default().covers(&narrow));
        assert!(Match::default().covers(&Match::default()));
        assert!(!narrow.covers(&Match::default()));
    }

    #[test]
    fn covers_needs_every_key_with_a_subset() {
        let earlier = Match {
            event: list(&["subscribe", "SCAN"]),
            ..Match::default()
        };
        let later = Match {
            event: list(&["scan"]),
            account: list(&["main"]),
            ..Match::default()
        };
        assert!(earlier.covers(&later), "event compares ignoring case");
        let later = Match {
            event: list(&["SCAN", "CLICK"]),
            ..Match::default()
        };
        assert!(!earlier.covers(&later), "CLICK escapes the earlier rule");
        let later = Match {
            account: list(&["main"]),
            ..Match::default()
        };
        assert!(!earlier.covers(&later), "later rule also matches messages");
    }

    #[test]
    fn covers_has_ticket_only_when_equal() {
        let earlier = Match {
            has_ticket: Some(true),
            ..Match::default()
        };
        assert!(earlier.covers(&Match {
            has_ticket: Some(true),
            ..Match::default()
        }));
        assert!(!earlier.covers(&Match {
            has_ticket: Some(false),
            ..Match::default()
        }));
        assert!(!earlier.covers(&Match::default()));
    }

    #[test]
    fn covers_prefixes() {
        let earlier = Match {
            event_key_prefix: list(&["qrscene_"]),
            ..Match::default()
        };
        let exact = Match {
            event_key: list(&["qrscene_1", "qrscene_2"]),
            ..Match::default()
        };
        assert!(earlier.covers(&exact));
        let longer = Match {
            event_key_prefix: list(&["qrscene_login"]),
            ..Match::default()
        };
        assert!(earlier.covers(&longer));
        let shorter = Match {
            event_key_prefix: list(&["qr"]),
            ..Match::default()
        };
        assert!(!earlier.covers(&shorter));
        let escapes = Match {
            event_key: list(&["qrscene_1", "other"]),
            ..Match::default()
        };
        assert!(!earlier.covers(&escapes));
        // An exact key never covers a prefix: the prefix admits more keys.
        let exact_earlier = Match {
            event_key: list(&["qrscene_"]),
            ..Match::default()
        };
        assert!(!exact_earlier.covers(&longer));
    }

    #[test]
    fn describe() {
        assert_eq!(Match::default().describe(), "*");
        let m = Match {
            event: list(&["subscribe", "SCAN"]),
            has_ticket: Some(true),
            ..Match::default()
        };
        assert_eq!(m.describe(), "event=subscribe|SCAN, has_ticket=true");
    }
}
