//! Pushes in JSON: what a Mini Program sends when its console's data format
//! (数据格式) is JSON. The secure body is `{"ToUserName": …, "Encrypt": …}`,
//! compat carries the plaintext fields beside `Encrypt`, and the message
//! itself (plaintext, or decrypted) is one JSON object of the same fields an
//! XML push has: `{"ToUserName": "gh_…", "FromUserName": "o…", "CreateTime":
//! 1717000000, "MsgType": "text", "Content": "…", "MsgId": 24602152426471537}`.
//!
//! # Read as strictly as XML
//!
//! * The root must be an object, and a key may appear only once in an
//!   object: `serde_json`'s own map keeps the last of two, another parser
//!   the first, so a push with `"FromUserName"` twice would be one user to
//!   the relay and another to a target. Objects are read into a list of
//!   entries and refused on a repeat.
//! * Numbers keep every digit as written: `MsgId` exceeds 2^53, so it is
//!   never read as a float (or as a number at all): each value is taken as
//!   its raw text ([`RawValue`]) and a number stays that text.
//! * The characters XML 1.0 forbids are refused in keys and strings too, and
//!   nesting is bounded, as for XML ([`crate::wechat::message`]).
//!
//! # What it becomes
//!
//! A [`Message`] like one parsed from XML (root `json`), so routing, the
//! dedup key and the sender check read `MsgType`, `Event` and the rest in
//! one way whatever the codec: strings, numbers and booleans are text, an
//! object has child elements, and an array's entries are repeated elements
//! of its key (the same top-level repeats as XML's are refused). And the
//! `fields` object of the `json` format, with numbers and booleans as
//! strings and arrays kept as arrays.

use super::message::{check_chars, first_repeat, quotable, Message, Node, MAX_DEPTH};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt;

/// Why a JSON document was refused. The reasons never quote the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("malformed JSON at line {line} column {column}")]
    Malformed { line: usize, column: usize },
    #[error("the root is not a JSON object")]
    Root,
    #[error("{0} appears more than once in an object")]
    Repeated(String),
    #[error("{0} appears more than once at the top level")]
    RepeatedTop(String),
    #[error("values nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a character XML does not allow")]
    ForbiddenChar,
    #[error("JSON is not UTF-8")]
    Utf8,
}

/// A push's JSON read strictly: the message as routing sees it, and its
/// fields for the `json` format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPush {
    pub message: Message,
    pub fields: Value,
}

/// A JSON value with every scalar as its text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Json {
    /// A string's content, a number's digits, `true` or `false`.
    Text(String),
    Null,
    Object(Vec<(String, Json)>),
    Array(Vec<Json>),
}

/// Parses a push body (or the decrypted message) that must be one JSON object.
pub fn parse_push(body: &[u8]) -> Result<JsonPush, JsonError> {
    let text = std::str::from_utf8(body).map_err(|_| JsonError::Utf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if !text.trim_start().starts_with('{') {
        // Also catches an array, a string or nothing at all before serde reads it.
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(JsonError::Root),
            Err(e) => Err(malformed(&e)),
        };
    }
    let Json::Object(entries) = object(text, 1)? else {
        return Err(JsonError::Root);
    };
    let fields: Vec<(String, Node)> = entries
        .iter()
        .flat_map(|(name, value)| nodes(name, value))
        .collect();
    if let Some(name) = first_repeat(&fields) {
        return Err(JsonError::RepeatedTop(quotable(name)));
    }
    Ok(JsonPush {
        fields: Value::Object(entries.iter().map(|(k, v)| (k.clone(), value(v))).collect()),
        message: Message {
            root: "json".to_owned(),
            fields,
        },
    })
}

/// The entries of an object, as written, repeats included.
struct Entries(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;

        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// An object's text read at `depth`, its keys checked for repeats.
fn object(text: &str, depth: usize) -> Result<Json, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    let Entries(raw) = serde_json::from_str(text).map_err(|e| malformed(&e))?;
    let mut seen = HashSet::with_capacity(raw.len());
    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        check_chars(&name).map_err(|_| JsonError::ForbiddenChar)?;
        if !seen.insert(name.clone()) {
            return Err(JsonError::Repeated(quotable(&name)));
        }
        let value = any(value.get(), depth)?;
        entries.push((name, value));
    }
    Ok(Json::Object(entries))
}

/// Any value's text, which serde_json has checked is one JSON value.
fn any(text: &str, depth: usize) -> Result<Json, JsonError> {
    match text.as_bytes().first() {
        Some(b'{') => object(text, depth + 1),
        Some(b'[') => {
            if depth + 1 > MAX_DEPTH {
                return Err(JsonError::TooDeep);
            }
            let items: Vec<Box<RawValue>> =
                serde_json::from_str(text).map_err(|e| malformed(&e))?;
            let items = items.iter().map(|item| any(item.get(), depth + 1));
            Ok(Json::Array(items.collect::<Result<_, _>>()?))
        }
        Some(b'"') => {
            let string: String = serde_json::from_str(text).map_err(|e| malformed(&e))?;
            check_chars(&string).map_err(|_| JsonError::ForbiddenChar)?;
            Ok(Json::Text(string))
        }
        Some(b'n') => Ok(Json::Null),
        // A number keeps its digits as written; `true` and `false` their name.
        _ => Ok(Json::Text(text.to_owned())),
    }
}

/// The elements `name: value` is in a message: an array's entries repeat
/// its name, as XML's list entries do.
fn nodes(name: &str, value: &Json) -> Vec<(String, Node)> {
    match value {
        Json::Text(text) => vec![(name.to_owned(), Node::Text(text.clone()))],
        Json::Null => vec![(name.to_owned(), Node::Text(String::new()))],
        Json::Object(entries) => {
            let children = entries.iter().flat_map(|(k, v)| nodes(k, v)).collect();
            vec![(name.to_owned(), Node::Children(children))]
        }
        Json::Array(items) => items.iter().flat_map(|item| nodes(name, item)).collect(),
    }
}

/// The `json` format's view: scalars as strings, `null` as is.
fn value(json: &Json) -> Value {
    match json {
        Json::Text(text) => Value::String(text.clone()),
        Json::Null => Value::Null,
        Json::Object(entries) => {
            let map: Map<String, Value> =
                entries.iter().map(|(k, v)| (k.clone(), value(v))).collect();
            Value::Object(map)
        }
        Json::Array(items) => Value::Array(items.iter().map(value).collect()),
    }
}

/// serde_json's error without its text, which may quote the document.
fn malformed(e: &serde_json::Error) -> JsonError {
    if e.to_string().starts_with("recursion limit exceeded") {
        return JsonError::TooDeep;
    }
    JsonError::Malformed {
        line: e.line(),
        column: e.column(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<JsonPush, JsonError> {
        parse_push(text.as_bytes())
    }

    const TEXT: &str = r#"{"ToUserName":"gh_3f1a2b9c8d7e","FromUserName":"oUser","CreateTime":1717000000,
        "MsgType":"text","Content":"你好","MsgId":24602152426471537123}"#;

    #[test]
    fn reads_fields_as_xml_would_give_them() {
        let push = parse(TEXT).unwrap();
        let m = &push.message;
        assert_eq!(m.msg_type(), Some("text"));
        assert_eq!(m.from_user(), Some("oUser"));
        assert_eq!(m.get("CreateTime"), Some("1717000000"));
        assert_eq!(m.get("Content"), Some("你好"));
        assert_eq!(m.dedup_key(), "msg|oUser|24602152426471537123");
    }

    #[test]
    fn numbers_keep_every_digit_and_become_strings() {
        let push = parse(
            r#"{"MsgId":24602152426471537123,"Precision":119.385040,"Big":1e400,"Neg":-0,"Ok":true}"#,
        )
        .unwrap();
        assert_eq!(
            push.fields,
            json!({"MsgId": "24602152426471537123", "Precision": "119.385040",
                   "Big": "1e400", "Neg": "-0", "Ok": "true"})
        );
    }

    #[test]
    fn nested_objects_and_lists_read_as_xml_elements() {
        let push = parse(
            r#"{"MsgType":"event","Event":"subscribe_msg_popup_event",
                "List":[{"TemplateId":"a","SubscribeStatusString":"accept"},{"TemplateId":"b"}],
                "Info":{"Scene":1,"Empty":null}}"#,
        )
        .unwrap();
        assert_eq!(push.message.event(), Some("subscribe_msg_popup_event"));
        assert_eq!(
            push.fields["List"],
            json!([{"TemplateId": "a", "SubscribeStatusString": "accept"}, {"TemplateId": "b"}])
        );
        assert_eq!(push.fields["Info"], json!({"Scene": "1", "Empty": null}));
        let lists = push
            .message
            .fields
            .iter()
            .filter(|(name, _)| name == "List")
            .count();
        assert_eq!(lists, 2);
    }

    #[test]
    fn a_key_twice_is_refused_at_any_depth() {
        assert_eq!(
            parse(r#"{"FromUserName":"a","MsgType":"text","FromUserName":"b"}"#),
            Err(JsonError::Repeated("<FromUserName>".into()))
        );
        assert_eq!(
            parse(r#"{"A":{"B":1,"B":2}}"#),
            Err(JsonError::Repeated("<B>".into()))
        );
        // Written differently, the same key: serde decodes escapes before comparing.
        assert_eq!(
            parse(r#"{"MsgType":"text","Msg\u0054ype":"event"}"#),
            Err(JsonError::Repeated("<MsgType>".into()))
        );
        // A routing field given twice as an array is as ambiguous as two elements.
        assert_eq!(
            parse(r#"{"MsgType":["text","event"]}"#),
            Err(JsonError::RepeatedTop("<MsgType>".into()))
        );
    }

    #[test]
    fn a_root_that_is_not_an_object_is_refused() {
        for body in ["[]", "[{\"MsgType\":\"text\"}]", "\"text\"", "1", "null"] {
            assert_eq!(parse(body), Err(JsonError::Root), "{body}");
        }
        for body in ["", "{", "{\"a\":1}x", "{\"a\":01}", "<xml/>", "{'a':1}"] {
            assert!(
                matches!(parse(body), Err(JsonError::Malformed { .. })),
                "{body}: {:?}",
                parse(body)
            );
        }
    }

    #[test]
    fn forbidden_characters_and_deep_nesting_are_refused() {
        assert_eq!(
            parse(r#"{"Content":"a\u0000b"}"#),
            Err(JsonError::ForbiddenChar)
        );
        assert_eq!(parse(r#"{"a\u0001":1}"#), Err(JsonError::ForbiddenChar));
        let deep = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        assert!(parse(&deep(MAX_DEPTH)).is_ok());
        assert_eq!(parse(&deep(MAX_DEPTH + 1)), Err(JsonError::TooDeep));
        assert!(parse(&format!("{{\"a\":{}", "[".repeat(100_000))).is_err());
    }

    #[test]
    fn errors_do_not_quote_the_document() {
        let err = parse(r#"{"secret": nope}"#).unwrap_err();
        assert!(!err.to_string().contains("nope"), "{err}");
        let err = parse(r#"{"secret-name-that-is-rather-long-indeed":1,"secret-name-that-is-rather-long-indeed":2}"#).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
