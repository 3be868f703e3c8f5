//! Broker adapters: rewrites of a login event's XML for brokers that read
//! WeChat's events their own way (the README's "Broker adapters" says which
//! broker needs which). Only the `plain` and `wechat` formats apply them: the
//! relay writes their body, and signs it afresh for `wechat`.
//!
//! * `strip_qrscene`: a first-time follower's `subscribe` carries
//!   `EventKey=qrscene_<scene>`, a follower's `SCAN` the bare `<scene>`; a
//!   broker that looks the key up as it is finds no login for the first.
//! * `subscribe_as_scan`: a ticketed `subscribe` becomes the `SCAN` a
//!   follower would have sent (`Event=SCAN`, the bare scene), for brokers that
//!   handle only `SCAN`.
//!
//! Everything else in the XML stays byte for byte; an event that is not a
//! ticketed follow is left alone, and so is a `SCAN` key, which has no prefix
//! to strip even when its scene happens to start with `qrscene_`.

use crate::config::Adapters;
use crate::wechat::message::Message;
use quick_xml::events::Event;
use quick_xml::Reader;
use std::borrow::Cow;
use std::ops::Range;

const SCENE_PREFIX: &str = "qrscene_";

/// `xml` with the target's adapters applied.
pub fn apply<'x>(adapters: &Adapters, xml: &'x str) -> Cow<'x, str> {
    if !(adapters.strip_qrscene || adapters.subscribe_as_scan) {
        return Cow::Borrowed(xml);
    }
    let Ok(message) = Message::parse(xml.as_bytes()) else {
        return Cow::Borrowed(xml);
    };
    let follow = message
        .event()
        .is_some_and(|e| e.eq_ignore_ascii_case("subscribe"));
    let scene = message
        .event_key()
        .and_then(|key| key.strip_prefix(SCENE_PREFIX));
    let (true, Some(scene)) = (follow, scene) else {
        return Cow::Borrowed(xml);
    };
    let ticketed = message.ticket().is_some_and(|t| !t.is_empty());
    let mut out = Cow::Borrowed(xml);
    if adapters.subscribe_as_scan && ticketed {
        out = replace_text(&out, "Event", "SCAN").map_or(out, Cow::Owned);
    }
    if adapters.strip_qrscene || (adapters.subscribe_as_scan && ticketed) {
        out = replace_text(&out, "EventKey", scene).map_or(out, Cow::Owned);
    }
    out
}

/// `xml` with the text of its top-level element `name` replaced by `value`
/// (as CDATA); `None` when there is no such element with text.
fn replace_text(xml: &str, name: &str, value: &str) -> Option<String> {
    let span = text_span(xml, name)?;
    let value = value.replace("]]>", "]]]]><![CDATA[>");
    Some(format!(
        "{}<![CDATA[{value}]]>{}",
        &xml[..span.start],
        &xml[span.end..]
    ))
}

/// Where the content of the first top-level element `name` lies in `xml`.
fn text_span(xml: &str, name: &str) -> Option<Range<usize>> {
    let mut reader = Reader::from_str(xml);
    let mut depth = 0usize;
    let mut start = None;
    loop {
        let before = usize::try_from(reader.buffer_position()).ok()?;
        match reader.read_event().ok()? {
            Event::Start(e) => {
                depth += 1;
                if depth == 2 && e.name().as_ref() == name.as_bytes() {
                    start = Some(usize::try_from(reader.buffer_position()).ok()?);
                }
            }
            Event::End(e) => {
                if depth == 2 && e.name().as_ref() == name.as_bytes() {
                    return start.map(|start| start..before);
                }
                depth = depth.checked_sub(1)?;
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLLOW: &str = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName>\
        <FromUserName><![CDATA[o1]]></FromUserName><CreateTime>1</CreateTime>\
        <MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event>\
        <EventKey><![CDATA[qrscene_login_7]]></EventKey><Ticket><![CDATA[T]]></Ticket></xml>";

    fn adapters(strip_qrscene: bool, subscribe_as_scan: bool) -> Adapters {
        Adapters {
            strip_qrscene,
            subscribe_as_scan,
            content_type: None,
        }
    }

    fn fields(xml: &str) -> (String, String) {
        let m = Message::parse(xml.as_bytes()).unwrap();
        (
            m.event().unwrap().to_owned(),
            m.event_key().unwrap().to_owned(),
        )
    }

    #[test]
    fn strip_qrscene_leaves_the_bare_scene_and_everything_else() {
        let out = apply(&adapters(true, false), FOLLOW);
        assert_eq!(fields(&out), ("subscribe".into(), "login_7".into()));
        assert_eq!(out, FOLLOW.replace("qrscene_login_7", "login_7"));
    }

    #[test]
    fn subscribe_as_scan_sends_what_a_followers_scan_would() {
        let out = apply(&adapters(false, true), FOLLOW);
        assert_eq!(fields(&out), ("SCAN".into(), "login_7".into()));
        let unticketed = FOLLOW.replace("<Ticket><![CDATA[T]]></Ticket>", "");
        assert_eq!(apply(&adapters(false, true), &unticketed), unticketed);
    }

    #[test]
    fn other_events_and_plain_keys_are_left_alone() {
        let scan = FOLLOW
            .replace("subscribe", "SCAN")
            .replace("qrscene_login_7", "qrscene_kept");
        assert_eq!(apply(&adapters(true, true), &scan), scan);
        let plain = FOLLOW.replace("qrscene_login_7", "last_trade_no_1");
        assert_eq!(apply(&adapters(true, true), &plain), plain);
        assert!(matches!(
            apply(&Adapters::default(), FOLLOW),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn unquoted_keys_and_cdata_terminators_are_rewritten_safely() {
        let bare = FOLLOW.replace(
            "<EventKey><![CDATA[qrscene_login_7]]></EventKey>",
            "<EventKey>qrscene_a]]&gt;b</EventKey>",
        );
        let out = apply(&adapters(true, false), &bare);
        assert_eq!(fields(&out).1, "a]]>b");
    }
}
