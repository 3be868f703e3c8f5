//! The XML of WeChat pushes.
//!
//! # What a push carries
//!
//! A message is one `<xml>` element whose children are its fields, text in
//! CDATA or plain. Every push has `ToUserName` (the account's original id,
//! `gh_…`), `FromUserName` (the sender's OpenID, which differs per account),
//! `CreateTime` (unix seconds) and `MsgType`. A user's message (`text`,
//! `image`, `voice`, `video`, `shortvideo`, `location`, `link`, …) has a
//! 64-bit `MsgId`. An event has `MsgType` `event` and an `Event` (`subscribe`,
//! `unsubscribe`, `SCAN`, `LOCATION`, `CLICK`, `VIEW`, …), usually an
//! `EventKey`, a `Ticket` when it comes from a QR code, and for some
//! notifications (a template message or a mass send finishing) a `MsgID`,
//! spelt with a capital D. A few events nest elements (lists of `item`).
//!
//! The outer body of an encrypted push is XML too: in secure mode just
//! `ToUserName` and `Encrypt`, in compat mode the plaintext fields as well.
//! Only the decrypted message is authenticated (its `<Encrypt>` is what
//! `msg_signature` covers), so routing, the dedup key and every delivery
//! format but `raw` (WeChat's bytes as they came) read it and never the outer
//! copies; [`Message::from_user`] in particular is only worth something from
//! a decrypted message or a plaintext account.
//!
//! # The login scene
//!
//! A parametric QR code carries a scene. A user who does not follow the
//! account yet and scans it sends `subscribe` with `EventKey` `qrscene_<scene>`;
//! a follower sends `SCAN` with the bare scene as `EventKey`. Both carry the
//! code's `Ticket`. The scene is thus the `EventKey` after `qrscene_` or the
//! whole `EventKey` (what the tests' `Message::scene` reads); a follow
//! without a QR code has no scene.
//!
//! # The dedup key
//!
//! WeChat re-sends a push it got no answer to in time, sometimes while the
//! first is still being handled, so each push has a key that is the same for
//! every copy ([`Message::dedup_key`]; the request path prefixes the account
//! id and logs only a hash of it). A user's message is identified by its
//! `MsgId`: `msg|<FromUserName>|<MsgId>`. Events have no `MsgId`; the sender
//! and `CreateTime` identify one only to the second, and a single action can
//! produce two events in the same second (a follow and the `LOCATION` report
//! that comes with it), so the key goes on with `Event`, `EventKey`, `Ticket`
//! and `MsgID`: `evt|<FromUserName>|<CreateTime>|<Event>|<EventKey>|<Ticket>|<MsgID>`,
//! absent fields empty. A message without a (non-empty) `MsgId` falls back to
//! the event form with its `MsgType` where `Event` would be. An Open
//! Platform's authorisation event has neither sender nor `MsgType`, only an
//! `InfoType` and fields that differ by it (two `authorized` of one second
//! differ in `AuthorizerAppid`), so its key is its `InfoType`, `CreateTime`
//! and a hash of all its fields: `info|<InfoType>|<CreateTime>|<hash>`. Each part comes
//! from the decrypted message, so a forged plaintext copy in a compat body can
//! neither collide with a real push nor mask one.
//!
//! # Parsing
//!
//! [`Message::parse`] reads the outer body of a push, the decrypted message
//! inside it, and a reply target's answer. The contract:
//!
//! * Any DOCTYPE or DTD declaration (`<!ENTITY`, `<!ELEMENT`, …), at the top or
//!   nested, is refused with [`XmlError::Doctype`]; nothing is ever expanded
//!   or fetched. Only XML's five predefined entities and character references
//!   are unescaped.
//! * An XML declaration, comments, processing instructions and whitespace
//!   around elements are accepted. Unclosed or mismatched tags, a second root,
//!   text after the root, and nesting deeper than 32 levels are refused.
//! * An element holds either text or child elements ([`Node`]). CDATA and plain
//!   text are read alike; an empty element is `""`. Text mixed in between
//!   child elements is dropped from this view: WeChat never sends mixed
//!   content, and the raw XML, which is what gets forwarded, keeps it anyway.
//! * Every element is kept, in document order, including ones this code does
//!   not know: WeChat adds fields over time.
//! * Values stay strings. `MsgId` is larger than 2^53 and must never become a
//!   JSON number.
//! * Characters XML 1.0 forbids (NUL and the other C0 controls but tab, line
//!   feed and carriage return; U+FFFE, U+FFFF) are refused wherever they
//!   appear, written as is or as a character reference (`&#0;`): parsers
//!   differ on them, and a downstream one may cut a value short.
//! * [`Message::parse_push`] is stricter, for what the relay verifies, routes
//!   and forwards on, and a reply target's answer is held to the same
//!   ([`Message::unambiguous`]): the root must be `<xml>` and no top-level
//!   element may repeat, so every parser reads the same `Encrypt`,
//!   `FromUserName` or `ToUserName`.
//!
//! No input, however hostile, makes parsing panic.

use quick_xml::errors::{IllFormedError, SyntaxError};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// WeChat's deepest push (`PUBLISHJOBFINISH`) nests 5 levels; 32 leaves room
/// for new ones while bounding the recursion of [`Node`] and its consumers.
pub(crate) const MAX_DEPTH: usize = 32;

/// `<name><![CDATA[value]]></name>`, with any `]]>` in the value split across
/// two sections so it cannot end the first early.
pub fn cdata_element(name: &str, value: &str) -> String {
    let value = value.replace("]]>", "]]]]><![CDATA[>");
    format!("<{name}><![CDATA[{value}]]></{name}>")
}

/// The content of an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Text and CDATA, unescaped; `""` for an empty element.
    Text(String),
    /// Child elements in document order; a name may repeat (`item`, `List`).
    Children(Vec<(String, Node)>),
}

/// A parsed push: the root element's name and its children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// WeChat's root is `xml`; a reply must use it too (see [`crate::wechat::reply`]).
    pub root: String,
    pub fields: Vec<(String, Node)>,
}

/// Why a document was refused. The reasons never quote the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("DOCTYPE and DTD declarations are refused")]
    Doctype,
    #[error("malformed XML: {0}")]
    Malformed(String),
    #[error("not an XML document")]
    NotXml,
    #[error("elements nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("XML is not UTF-8")]
    Utf8,
    #[error("a character XML does not allow")]
    ForbiddenChar,
    #[error("the root element is not <xml>")]
    Root,
    #[error("{0} appears more than once at the top level")]
    Repeated(String),
}

/// What a push is, for routing and deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageKind {
    /// An ordinary message; `msg_type` is `""` when `MsgType` is missing.
    Message { msg_type: String },
    /// `MsgType` is `event` (any case); `event` is the `Event` value as sent.
    Event { event: String },
}

/// An element being read: its text and children so far.
struct Open {
    name: String,
    text: String,
    children: Vec<(String, Node)>,
}

impl Open {
    fn into_field(self) -> (String, Node) {
        let node = if self.children.is_empty() {
            Node::Text(self.text)
        } else {
            Node::Children(self.children)
        };
        (self.name, node)
    }
}

/// The pushes a QR-code login flow is made of, as the login funnel counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginEvent {
    /// A first follow by scanning a parametric QR code (`EventKey=qrscene_…`).
    SubscribeScene,
    /// A follow without a scene (search, a name card, a payment).
    SubscribePlain,
    /// A follower scanning a parametric QR code.
    Scan,
}

impl LoginEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginEvent::SubscribeScene => "subscribe_scene",
            LoginEvent::SubscribePlain => "subscribe_plain",
            LoginEvent::Scan => "scan",
        }
    }
}

impl Message {
    /// Parses a push or the message inside one: [`Message::parse`], then the
    /// root must be `<xml>` and a top-level element may repeat only if it is
    /// a list container (`item`, `List`) holding elements.
    pub fn parse_push(xml: &[u8]) -> Result<Message, XmlError> {
        let message = Message::parse(xml)?;
        message.unambiguous()?;
        Ok(message)
    }

    /// What [`Message::parse_push`] adds to [`Message::parse`], for a
    /// document parsed already (a reply, which must be as unambiguous as a
    /// push): the root is `<xml>` and no top-level element but a list
    /// container holding elements repeats.
    pub fn unambiguous(&self) -> Result<(), XmlError> {
        if self.root != "xml" {
            return Err(XmlError::Root);
        }
        match first_repeat(&self.fields) {
            Some(name) => Err(XmlError::Repeated(quotable(name))),
            None => Ok(()),
        }
    }

    /// Parses a whole document; see the module docs for what is accepted.
    pub fn parse(xml: &[u8]) -> Result<Message, XmlError> {
        let text = std::str::from_utf8(xml).map_err(|_| XmlError::Utf8)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // Written as is, anywhere: text, CDATA, attributes, comments.
        check_chars(text)?;
        let mut reader = Reader::from_str(text);
        let mut open: Vec<Open> = Vec::new();
        let mut root: Option<(String, Node)> = None;
        let mut past_start = false;

        loop {
            let event = reader
                .read_event()
                .map_err(|err| refusal(&err, text, reader.error_position()))?;
            match event {
                Event::DocType(_) => return Err(XmlError::Doctype),
                Event::Decl(_) if past_start => {
                    return Err(malformed("XML declaration not at the start"));
                }
                Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
                Event::Start(start) => {
                    let name = start_element(&start, &open, root.is_some())?;
                    open.push(Open {
                        name,
                        text: String::new(),
                        children: Vec::new(),
                    });
                }
                Event::Empty(start) => {
                    let name = start_element(&start, &open, root.is_some())?;
                    close((name, Node::Text(String::new())), &mut open, &mut root);
                }
                Event::End(_) => {
                    // quick-xml has already matched the end tag against the open one.
                    let element = open.pop().ok_or_else(|| malformed("unmatched end tag"))?;
                    close(element.into_field(), &mut open, &mut root);
                }
                Event::Text(raw) => {
                    let content = raw
                        .unescape()
                        .map_err(|_| malformed("unknown or unterminated entity reference"))?;
                    // Written as a character reference: only text that had a
                    // reference in it differs from what was checked above.
                    if let std::borrow::Cow::Owned(unescaped) = &content {
                        check_chars(unescaped)?;
                    }
                    add_text(&content, &mut open, root.is_some())?;
                }
                Event::CData(raw) => {
                    let content = std::str::from_utf8(&raw).map_err(|_| XmlError::Utf8)?;
                    add_text(content, &mut open, root.is_some())?;
                }
                Event::Eof => break,
            }
            past_start = true;
        }

        if !open.is_empty() {
            return Err(malformed("unclosed element"));
        }
        match root {
            Some((root, Node::Children(fields))) => Ok(Message { root, fields }),
            Some((root, Node::Text(_))) => Ok(Message {
                root,
                fields: Vec::new(),
            }),
            None => Err(XmlError::NotXml),
        }
    }

    /// The text of the first top-level element called `name`; `Some("")` for an
    /// empty one, `None` when absent or when it has child elements.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.iter().find_map(|(field, node)| match node {
            Node::Text(text) if field == name => Some(text.as_str()),
            _ => None,
        })
    }

    pub fn msg_type(&self) -> Option<&str> {
        self.get("MsgType")
    }

    pub fn event(&self) -> Option<&str> {
        self.get("Event")
    }

    /// Whether WeChat shows the user a passive reply to this push: one to a
    /// message the user sent, or to a follow, a scan, a menu click or a
    /// scan that waits for its answer. A reply to anything else (an
    /// unfollow, a menu link, a location report, a job's receipt) is
    /// accepted and shown to no one.
    pub fn shows_a_reply(&self) -> bool {
        const MESSAGES: [&str; 7] = [
            "text",
            "image",
            "voice",
            "video",
            "shortvideo",
            "location",
            "link",
        ];
        const EVENTS: [&str; 4] = ["subscribe", "SCAN", "CLICK", "scancode_waitmsg"];
        match (self.msg_type(), self.event()) {
            (Some("event"), Some(event)) => EVENTS.contains(&event),
            (Some(msg_type), _) => MESSAGES.contains(&msg_type),
            (None, _) => false,
        }
    }

    pub fn event_key(&self) -> Option<&str> {
        self.get("EventKey")
    }

    /// The sender's OpenID. Trust it only from a decrypted message: the
    /// plaintext copy in a compat body is covered by no signature.
    pub fn from_user(&self) -> Option<&str> {
        self.get("FromUserName")
    }

    pub fn ticket(&self) -> Option<&str> {
        self.get("Ticket")
    }

    /// The fields as a JSON object in document order: text becomes a string,
    /// children an object, `item` and `List` entries an array (even of one),
    /// and any other name repeated among siblings an array of its values.
    pub fn fields_json(&self) -> Value {
        children_json(&self.fields)
    }

    /// [`Message::fields_json`] as JSON text, written straight from the
    /// fields rather than through a `Value`: what the spool keeps.
    pub fn fields_text(&self) -> String {
        let text = serde_json::to_string(&ChildrenJson(&self.fields));
        // Only strings and objects of them: serde_json cannot fail on them.
        text.unwrap_or_else(|_| self.fields_json().to_string())
    }

    pub fn kind(&self) -> MessageKind {
        match self.msg_type() {
            Some(msg_type) if msg_type.eq_ignore_ascii_case("event") => MessageKind::Event {
                event: self.event().unwrap_or_default().to_owned(),
            },
            msg_type => MessageKind::Message {
                msg_type: msg_type.unwrap_or_default().to_owned(),
            },
        }
    }

    /// What part the push plays in a QR-code login, if any.
    pub fn login(&self) -> Option<LoginEvent> {
        let MessageKind::Event { event } = self.kind() else {
            return None;
        };
        if event.eq_ignore_ascii_case("SCAN") {
            return Some(LoginEvent::Scan);
        }
        if !event.eq_ignore_ascii_case("subscribe") {
            return None;
        }
        let scene = self
            .event_key()
            .is_some_and(|key| key.starts_with("qrscene_"));
        Some(if scene {
            LoginEvent::SubscribeScene
        } else {
            LoginEvent::SubscribePlain
        })
    }

    /// The login scene of a parametric QR code (see the module docs): the
    /// `EventKey` after `qrscene_` for `subscribe`, the whole `EventKey` for
    /// `SCAN`. `None` for anything else, including a follow without a scene.
    #[cfg(any(test, feature = "test-util"))]
    pub fn scene(&self) -> Option<String> {
        let MessageKind::Event { event } = self.kind() else {
            return None;
        };
        let key = self.event_key()?;
        let scene = if event.eq_ignore_ascii_case("subscribe") {
            key.strip_prefix("qrscene_")?
        } else if event.eq_ignore_ascii_case("SCAN") {
            key
        } else {
            return None;
        };
        (!scene.is_empty()).then(|| scene.to_owned())
    }

    /// The key under which WeChat's retries of this push are recognised
    /// (see the module docs), built from decrypted fields only:
    ///
    /// * a message: `msg|<FromUserName>|<MsgId>`;
    /// * an event: `evt|<FromUserName>|<CreateTime>|<Event>|<EventKey>|<Ticket>|<MsgID>`,
    ///   absent fields empty. `Event` and `EventKey` are included because two
    ///   events of one user can share a second (subscribe then LOCATION);
    /// * a message without a `MsgId`: the event form with `MsgType` for `Event`;
    /// * an Open Platform authorisation event (an `InfoType` and no
    ///   `MsgType`): `info|<InfoType>|<CreateTime>|<hash of its fields>`.
    pub fn dedup_key(&self) -> String {
        let field = |name| self.get(name).unwrap_or_default();
        if let (Some(info_type), None) = (self.get("InfoType"), self.msg_type()) {
            // What else an authorisation event carries differs by InfoType;
            // its whole content tells two events of one second apart.
            let content = Sha256::digest(self.fields_json().to_string().as_bytes());
            let content = hex::encode(&content[..16]);
            return format!("info|{info_type}|{}|{content}", field("CreateTime"));
        }
        let from = self.from_user().unwrap_or_default();
        let what = match self.kind() {
            MessageKind::Message { msg_type } => {
                match self.get("MsgId").filter(|id| !id.is_empty()) {
                    Some(msg_id) => return format!("msg|{from}|{msg_id}"),
                    None => msg_type,
                }
            }
            MessageKind::Event { event } => event,
        };
        format!(
            "evt|{from}|{}|{what}|{}|{}|{}",
            field("CreateTime"),
            field("EventKey"),
            field("Ticket"),
            field("MsgID"),
        )
    }
}

fn malformed(reason: &str) -> XmlError {
    XmlError::Malformed(reason.to_owned())
}

/// Checks an opening tag where it stands and returns its name.
fn start_element(start: &BytesStart, open: &[Open], root_done: bool) -> Result<String, XmlError> {
    if open.is_empty() && root_done {
        return Err(malformed("more than one root element"));
    }
    if open.len() >= MAX_DEPTH {
        return Err(XmlError::TooDeep);
    }
    let name = std::str::from_utf8(start.name().into_inner()).map_err(|_| XmlError::Utf8)?;
    if !is_name(name) {
        return Err(malformed("invalid element name"));
    }
    // Attributes are unused, but a document with broken ones is not well-formed.
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|_| malformed("invalid attribute"))?;
        let value = attribute
            .unescape_value()
            .map_err(|_| malformed("unknown or unterminated entity reference"))?;
        check_chars(&value)?;
    }
    Ok(name.to_owned())
}

/// Refuses the characters outside XML 1.0's `Char` production. Surrogates
/// cannot occur in a `str`.
pub(crate) fn check_chars(text: &str) -> Result<(), XmlError> {
    // Every push passes here, so the scan is written to vectorise: the C0
    // controls are single bytes in UTF-8, and a fold does not stop early.
    let control = text.bytes().fold(false, |found, b| {
        found | (b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r')
    });
    if control || text.contains('\u{FFFE}') || text.contains('\u{FFFF}') {
        return Err(XmlError::ForbiddenChar);
    }
    Ok(())
}

/// An element name fit for a refusal's reason and a log line: WeChat's field
/// names are short ASCII; anything else is not repeated back.
pub(crate) fn quotable(name: &str) -> String {
    if name.len() <= 32 && name.is_ascii() {
        format!("<{name}>")
    } else {
        "an element".to_owned()
    }
}

/// The first top-level name that repeats where a push may not repeat one:
/// only a list container (`item`, `List`) holding elements may.
pub(crate) fn first_repeat(fields: &[(String, Node)]) -> Option<&str> {
    // A push has a dozen fields: a scan beats a set.
    fields.iter().enumerate().find_map(|(i, (name, node))| {
        let list = LIST_ENTRIES.contains(&name.as_str()) && matches!(node, Node::Children(_));
        let repeated = !list && fields[..i].iter().any(|(seen, _)| seen == name);
        repeated.then_some(name.as_str())
    })
}

/// Files a finished element under its parent, or as the root.
fn close(field: (String, Node), open: &mut [Open], root: &mut Option<(String, Node)>) {
    match open.last_mut() {
        Some(parent) => parent.children.push(field),
        None => *root = Some(field),
    }
}

fn add_text(content: &str, open: &mut [Open], root_done: bool) -> Result<(), XmlError> {
    match open.last_mut() {
        Some(element) => element.text.push_str(content),
        None if content
            .bytes()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) => {}
        None if root_done => return Err(malformed("content after the root element")),
        None => return Err(XmlError::NotXml),
    }
    Ok(())
}

/// An XML name, loosely: quick-xml accepts `<>` and `< a>`, which no XML
/// parser downstream would. Non-ASCII is allowed as XML allows most of it.
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    let start_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':' || !c.is_ascii());
    start_ok
        && chars.all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.') || !c.is_ascii()
        })
}

/// Maps a quick-xml error to a refusal without quoting the document.
fn refusal(err: &quick_xml::Error, text: &str, position: u64) -> XmlError {
    use quick_xml::Error;
    let reason = match err {
        Error::Syntax(SyntaxError::UnclosedDoctype)
        | Error::IllFormed(IllFormedError::MissingDoctypeName) => return XmlError::Doctype,
        // `<!ENTITY …>` and friends outside a DOCTYPE are DTD markup out of place.
        Error::Syntax(SyntaxError::InvalidBangMarkup) if is_dtd_markup(text, position) => {
            return XmlError::Doctype
        }
        Error::Syntax(syntax) => syntax.to_string(),
        Error::IllFormed(IllFormedError::MissingEndTag(_)) => "unclosed element".to_owned(),
        Error::IllFormed(IllFormedError::UnmatchedEndTag(_)) => "unmatched end tag".to_owned(),
        Error::IllFormed(IllFormedError::MismatchedEndTag { .. }) => {
            "mismatched end tag".to_owned()
        }
        Error::IllFormed(IllFormedError::MissingDeclVersion(_)) => {
            "XML declaration without a version".to_owned()
        }
        Error::IllFormed(IllFormedError::DoubleHyphenInComment) => {
            "`--` inside a comment".to_owned()
        }
        Error::InvalidAttr(_) => "invalid attribute".to_owned(),
        Error::Escape(_) => "unknown or unterminated entity reference".to_owned(),
        Error::Io(_) | Error::Encoding(_) | Error::Namespace(_) => "unreadable XML".to_owned(),
    };
    XmlError::Malformed(format!("{reason} at byte {position}"))
}

fn is_dtd_markup(text: &str, position: u64) -> bool {
    let rest = usize::try_from(position)
        .ok()
        .and_then(|at| text.as_bytes().get(at..))
        .unwrap_or_default();
    ["<!ENTITY", "<!ELEMENT", "<!ATTLIST", "<!NOTATION"]
        .iter()
        .any(|keyword| {
            rest.get(..keyword.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(keyword.as_bytes()))
        })
}

fn node_json(node: &Node) -> Value {
    match node {
        Node::Text(text) => Value::String(text.clone()),
        Node::Children(children) => children_json(children),
    }
}

/// WeChat's list entries: `<PicList><item>…</item></PicList>`, the
/// subscribe-message events' `<List>`. Always arrays, so a list of one has the
/// same shape as a list of two. The only top-level names a push may repeat
/// (none does today: WeChat's lists are nested).
const LIST_ENTRIES: [&str; 2] = ["item", "List"];

/// Children in document order (serde_json keeps insertion order); a list
/// entry, or any name repeated under one parent, becomes an array.
fn children_json(children: &[(String, Node)]) -> Value {
    let mut object = Map::new();
    for (name, node) in children {
        let value = node_json(node);
        match object.get_mut(name) {
            None if LIST_ENTRIES.contains(&name.as_str()) => {
                object.insert(name.clone(), Value::Array(vec![value]));
            }
            None => {
                object.insert(name.clone(), value);
            }
            // A node is never an array itself, so an array here means a repeat.
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    Value::Object(object)
}

/// [`children_json`]'s object as JSON, written without building it: a name
/// goes where it first appears, with every node of that name in an array if
/// it repeats or is a list entry.
struct ChildrenJson<'a>(&'a [(String, Node)]);

impl serde::Serialize for ChildrenJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let children = self.0;
        let mut map = serializer.serialize_map(None)?;
        for (i, (name, node)) in children.iter().enumerate() {
            if children[..i].iter().any(|(seen, _)| seen == name) {
                continue;
            }
            let repeated = children[i + 1..].iter().any(|(other, _)| other == name);
            if repeated || LIST_ENTRIES.contains(&name.as_str()) {
                map.serialize_entry(name, &Named(&children[i..], name))?;
            } else {
                map.serialize_entry(name, &NodeJson(node))?;
            }
        }
        map.end()
    }
}

/// The nodes called `.1` among `.0`, as an array.
struct Named<'a>(&'a [(String, Node)], &'a str);

impl serde::Serialize for Named<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Named(children, name) = *self;
        serializer.collect_seq(
            children
                .iter()
                .filter(|(other, _)| other == name)
                .map(|(_, node)| NodeJson(node)),
        )
    }
}

struct NodeJson<'a>(&'a Node);

impl serde::Serialize for NodeJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Node::Text(text) => serializer.serialize_str(text),
            Node::Children(children) => ChildrenJson(children).serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(xml: &str) -> Result<Message, XmlError> {
        Message::parse(xml.as_bytes())
    }

    fn text(value: &str) -> Node {
        Node::Text(value.to_owned())
    }

    const SCAN: &str = "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\n\
        <FromUserName><![CDATA[oUser]]></FromUserName>\n<CreateTime>1716999972</CreateTime>\n\
        <MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[SCAN]]></Event>\n\
        <EventKey><![CDATA[login:7f3c]]></EventKey>\n<Ticket><![CDATA[T1]]></Ticket>\n</xml>";

    #[test]
    fn a_reply_is_shown_to_user_messages_and_to_follows_scans_and_clicks_only() {
        let push = |msg_type: &str, event: &str| {
            let xml = format!("<xml><MsgType>{msg_type}</MsgType><Event>{event}</Event></xml>");
            parse(&xml).unwrap().shows_a_reply()
        };
        let shown = [
            "text",
            "image",
            "voice",
            "video",
            "shortvideo",
            "location",
            "link",
        ];
        for msg_type in shown {
            assert!(push(msg_type, ""), "{msg_type}");
        }
        for event in ["subscribe", "SCAN", "CLICK", "scancode_waitmsg"] {
            assert!(push("event", event), "{event}");
        }
        let unseen = [
            "unsubscribe",
            "VIEW",
            "LOCATION",
            "TEMPLATESENDJOBFINISH",
            "MASSSENDJOBFINISH",
            "scancode_push",
            "view_miniprogram",
        ];
        for event in unseen {
            assert!(!push("event", event), "{event}");
        }
        assert!(!push("device_event", ""));
        assert!(!parse("<xml><Content>hi</Content></xml>")
            .unwrap()
            .shows_a_reply());
    }

    #[test]
    fn login_events_are_told_apart_by_event_and_scene() {
        let event = |event: &str, key: &str| {
            let xml = format!(
                "<xml><MsgType>event</MsgType><Event>{event}</Event><EventKey>{key}</EventKey></xml>"
            );
            Message::parse(xml.as_bytes()).unwrap().login()
        };
        assert_eq!(
            event("subscribe", "qrscene_7"),
            Some(LoginEvent::SubscribeScene)
        );
        assert_eq!(event("subscribe", ""), Some(LoginEvent::SubscribePlain));
        assert_eq!(
            event("subscribe", "last_trade_no_1"),
            Some(LoginEvent::SubscribePlain)
        );
        assert_eq!(event("SCAN", "7"), Some(LoginEvent::Scan));
        assert_eq!(event("CLICK", "qrscene_7"), None);
        let text = Message::parse(b"<xml><MsgType>text</MsgType></xml>").unwrap();
        assert_eq!(text.login(), None);
    }

    #[test]
    fn reads_cdata_and_plain_text_alike() {
        let message = parse(SCAN).unwrap();
        assert_eq!(message.root, "xml");
        assert_eq!(message.fields.len(), 7);
        assert_eq!(message.get("FromUserName"), Some("oUser"));
        assert_eq!(message.get("CreateTime"), Some("1716999972"));
        assert_eq!(message.get("Nope"), None);
        let plain = parse("<xml><A>x</A><B><![CDATA[x]]></B><C>x<![CDATA[y]]>z</C></xml>").unwrap();
        assert_eq!(plain.get("A"), plain.get("B"));
        assert_eq!(plain.get("C"), Some("xyz"));
    }

    #[test]
    fn an_empty_element_is_an_empty_string() {
        let message = parse(
            "<xml><EventKey></EventKey><Ticket/><Recognition><![CDATA[]]></Recognition></xml>",
        )
        .unwrap();
        assert_eq!(message.event_key(), Some(""));
        assert_eq!(message.ticket(), Some(""));
        assert_eq!(message.get("Recognition"), Some(""));
    }

    #[test]
    fn unescapes_predefined_entities_only_outside_cdata() {
        let message =
            parse("<xml><A>a &amp; b &lt;c&gt; &#x4F60;&#22909;</A><B><![CDATA[&amp;]]></B></xml>")
                .unwrap();
        assert_eq!(message.get("A"), Some("a & b <c> 你好"));
        assert_eq!(message.get("B"), Some("&amp;"));
        assert!(matches!(
            parse("<xml><A>&xxe;</A></xml>"),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(
            parse("<xml><A>a & b</A></xml>"),
            Err(XmlError::Malformed(_))
        ));
    }

    #[test]
    fn keeps_text_exactly_including_whitespace() {
        let message =
            parse("<xml><Content>  two  spaces\n</Content><Blank> </Blank></xml>").unwrap();
        assert_eq!(message.get("Content"), Some("  two  spaces\n"));
        assert_eq!(message.get("Blank"), Some(" "));
    }

    #[test]
    fn keeps_unknown_and_nested_elements_in_order() {
        let message = parse(
            "<xml><MsgType>event</MsgType><NewField>v</NewField>\
             <SendPicsInfo><Count>2</Count><PicList><item><PicMd5Sum>a</PicMd5Sum></item>\
             <item><PicMd5Sum>b</PicMd5Sum></item></PicList></SendPicsInfo></xml>",
        )
        .unwrap();
        let names: Vec<_> = message
            .fields
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(names, ["MsgType", "NewField", "SendPicsInfo"]);
        let item = |sum: &str| {
            (
                "item".to_owned(),
                Node::Children(vec![("PicMd5Sum".to_owned(), text(sum))]),
            )
        };
        assert_eq!(
            message.fields[2].1,
            Node::Children(vec![
                ("Count".to_owned(), text("2")),
                (
                    "PicList".to_owned(),
                    Node::Children(vec![item("a"), item("b")])
                ),
            ])
        );
        // `get` only answers for text.
        assert_eq!(message.get("SendPicsInfo"), None);
        assert_eq!(
            message.fields_json(),
            json!({"MsgType": "event", "NewField": "v",
                   "SendPicsInfo": {"Count": "2", "PicList": {"item": [{"PicMd5Sum": "a"}, {"PicMd5Sum": "b"}]}}})
        );
    }

    #[test]
    fn fields_keep_document_order_and_a_list_of_one_is_an_array() {
        let message = parse(
            "<xml><ToUserName>t</ToUserName><CreateTime>1</CreateTime>\
             <SubscribeMsgPopupEvent><List><TemplateId>x</TemplateId></List></SubscribeMsgPopupEvent></xml>",
        )
        .unwrap();
        assert_eq!(
            message.fields_json().to_string(),
            r#"{"ToUserName":"t","CreateTime":"1","SubscribeMsgPopupEvent":{"List":[{"TemplateId":"x"}]}}"#
        );
    }

    /// The text the spool keeps is `fields_json`'s, for lists, lists of
    /// one, names repeated among nested siblings, and escapes.
    #[test]
    fn fields_text_is_the_fields_json_written() {
        for xml in [
            "<xml><SendPicsInfo><Count>2</Count><PicList><item><PicMd5Sum>a</PicMd5Sum></item>\
             <item><PicMd5Sum>b</PicMd5Sum></item></PicList></SendPicsInfo></xml>",
            "<xml><E><List><T>x</T></List></E></xml>",
            "<xml><N><A>1</A><B>2</B><A>3</A><A><C>4</C></A></N><Q>\"\\&lt;\té</Q></xml>",
            "<xml></xml>",
        ] {
            let message = parse(xml).unwrap();
            assert_eq!(
                message.fields_text(),
                message.fields_json().to_string(),
                "{xml}"
            );
        }
    }

    #[test]
    fn msg_id_stays_a_string() {
        let message = parse("<xml><MsgId>6054768590064713728</MsgId></xml>").unwrap();
        assert_eq!(
            message.fields_json(),
            json!({"MsgId": "6054768590064713728"})
        );
    }

    #[test]
    fn accepts_a_declaration_comments_and_pretty_printing() {
        let pretty = "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- pushed -->\n<xml>\n    \
            <ToUserName><![CDATA[gh_1]]></ToUserName>\n    <Nested>\n        <A>1</A>\n    </Nested>\n\
            </xml>\n<!-- end -->\n";
        let message = parse(pretty).unwrap();
        assert_eq!(message.get("ToUserName"), Some("gh_1"));
        assert_eq!(
            message.fields[1].1,
            Node::Children(vec![("A".to_owned(), text("1"))])
        );
    }

    #[test]
    fn drops_text_mixed_between_elements() {
        let message = parse("<xml><A>stray<B>1</B>text</A></xml>").unwrap();
        assert_eq!(
            message.fields[0].1,
            Node::Children(vec![("B".to_owned(), text("1"))])
        );
    }

    #[test]
    fn refuses_doctype_and_dtd_markup_anywhere() {
        for xml in [
            "<!DOCTYPE xml><xml/>",
            "<?xml version=\"1.0\"?>\n<!DOCTYPE xml [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><xml><A>&x;</A></xml>",
            "<!doctype xml><xml/>",
            "<xml><!DOCTYPE inner><A/></xml>",
            "<xml><A><!DOCTYPE inner></A></xml>",
            "<xml><!ENTITY x \"y\"><A>&x;</A></xml>",
            "<xml><A><!ELEMENT a ANY></A></xml>",
            "<xml/><!DOCTYPE after>",
            "<!ENTITY x \"y\"><xml/>",
            "<!DOCTYPE xml [<!ENTITY x \"y\">",
        ] {
            assert_eq!(parse(xml), Err(XmlError::Doctype), "{xml}");
        }
        // The same words inside CDATA are just text.
        let message =
            parse("<xml><Content><![CDATA[<!DOCTYPE html><!ENTITY x>]]></Content></xml>").unwrap();
        assert_eq!(message.get("Content"), Some("<!DOCTYPE html><!ENTITY x>"));
    }

    #[test]
    fn refuses_broken_documents() {
        for xml in [
            "<xml><A>1</A>",
            "<xml><A>1</B></xml>",
            "<xml></xml></xml>",
            "</xml>",
            "<xml/><xml/>",
            "<xml/>trailing",
            "<xml/><![CDATA[x]]>",
            "<xml><A>1</A></xml>\n<?xml version=\"1.0\"?>",
            "<xml><![CDATA[open",
            "<xml><!-- open",
            "<xml a=1/>",
            "<xml a='1' a='2'/>",
            "<>",
            "< xml/>",
            "<1a/>",
            "<xml",
        ] {
            assert!(
                matches!(parse(xml), Err(XmlError::Malformed(_))),
                "{xml}: {:?}",
                parse(xml)
            );
        }
    }

    #[test]
    fn refuses_what_is_not_xml() {
        for body in [
            "",
            "   \n",
            "success",
            "{\"xml\":1}",
            "<!-- only a comment -->",
            "text<xml/>",
        ] {
            assert_eq!(parse(body), Err(XmlError::NotXml), "{body:?}");
        }
        assert_eq!(Message::parse(b"<xml>\xff</xml>"), Err(XmlError::Utf8));
    }

    #[test]
    fn refuses_deep_nesting() {
        let nest = |depth: usize| "<a>".repeat(depth) + &"</a>".repeat(depth);
        assert!(parse(&nest(MAX_DEPTH)).is_ok());
        assert_eq!(parse(&nest(MAX_DEPTH + 1)), Err(XmlError::TooDeep));
        let open_only = "<a>".repeat(100_000);
        assert_eq!(parse(&open_only), Err(XmlError::TooDeep));
        let empty_at_depth = "<a>".repeat(MAX_DEPTH) + "<b/>" + &"</a>".repeat(MAX_DEPTH);
        assert_eq!(parse(&empty_at_depth), Err(XmlError::TooDeep));
    }

    #[test]
    fn refuses_characters_xml_forbids_however_written() {
        for xml in [
            "<xml><A>a\u{0}b</A></xml>",
            "<xml><A><![CDATA[\u{1}]]></A></xml>",
            "<xml><A b=\"\u{1F}\"/></xml>",
            "<xml><!-- \u{0} --><A/></xml>",
            "<xml><A>\u{FFFF}</A></xml>",
        ] {
            assert_eq!(parse(xml), Err(XmlError::ForbiddenChar), "{xml:?}");
        }
        for xml in [
            "<xml><A>&#0;</A></xml>",
            "<xml><A>&#x8;</A></xml>",
            "<xml><A>&#xFFFE;</A></xml>",
            "<xml><A b=\"&#0;\"/></xml>",
            "<xml><A b=\"&#x1b;\"/></xml>",
        ] {
            assert!(parse(xml).is_err(), "{xml:?}");
        }
        let allowed =
            parse("<xml><A b=\"&#9;\">\t\r\n&#10;&#xD7FF;&#xE000;\u{10FFFF}</A></xml>").unwrap();
        assert_eq!(allowed.get("A"), Some("\t\r\n\n\u{D7FF}\u{E000}\u{10FFFF}"));
    }

    #[test]
    fn a_push_has_an_xml_root_and_no_repeated_top_level_field() {
        assert_eq!(
            Message::parse_push(b"<root><A>1</A></root>"),
            Err(XmlError::Root)
        );
        assert_eq!(
            Message::parse_push(b"<xml><Encrypt>a</Encrypt><Encrypt>b</Encrypt></xml>"),
            Err(XmlError::Repeated("<Encrypt>".into()))
        );
        assert_eq!(
            Message::parse_push(b"<xml><A><B>1</B></A><A><B>2</B></A></xml>"),
            Err(XmlError::Repeated("<A>".into()))
        );
        let long = format!("<xml><{0}/><{0}/></xml>", "N".repeat(40));
        assert_eq!(
            Message::parse_push(long.as_bytes()),
            Err(XmlError::Repeated("an element".into()))
        );
        // Lists repeat their items below the top level, and list containers may.
        let lists = b"<xml><SendPicsInfo><Count>2</Count><PicList><item><A>1</A></item>\
            <item><A>2</A></item></PicList></SendPicsInfo><item><A>1</A></item><item><A>2</A></item></xml>";
        assert!(Message::parse_push(lists).is_ok());
        assert_eq!(
            Message::parse_push(b"<xml><item>1</item><item>2</item></xml>"),
            Err(XmlError::Repeated("<item>".into()))
        );
    }

    #[test]
    fn errors_do_not_quote_the_document() {
        let err = parse("<xml><secret-name>1</other-secret></xml>").unwrap_err();
        let message = err.to_string();
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn classifies_messages_and_events() {
        let message = parse("<xml><MsgType>text</MsgType><MsgId>1</MsgId></xml>").unwrap();
        assert_eq!(
            message.kind(),
            MessageKind::Message {
                msg_type: "text".to_owned()
            }
        );
        assert_eq!(
            parse("<xml/>").unwrap().kind(),
            MessageKind::Message {
                msg_type: String::new()
            }
        );
        let event = parse("<xml><MsgType>EVENT</MsgType><Event>LOCATION</Event></xml>").unwrap();
        assert_eq!(
            event.kind(),
            MessageKind::Event {
                event: "LOCATION".to_owned()
            }
        );
        let no_event = parse("<xml><MsgType>event</MsgType></xml>").unwrap();
        assert_eq!(
            no_event.kind(),
            MessageKind::Event {
                event: String::new()
            }
        );
    }

    fn event(name: &str, key: Option<&str>) -> Message {
        let key = key
            .map(|key| format!("<EventKey><![CDATA[{key}]]></EventKey>"))
            .unwrap_or_default();
        parse(&format!(
            "<xml><MsgType>event</MsgType><Event>{name}</Event>{key}</xml>"
        ))
        .unwrap()
    }

    #[test]
    fn finds_the_login_scene() {
        assert_eq!(
            event("subscribe", Some("qrscene_login:7f3c"))
                .scene()
                .as_deref(),
            Some("login:7f3c")
        );
        assert_eq!(
            event("Subscribe", Some("qrscene_123")).scene().as_deref(),
            Some("123")
        );
        assert_eq!(
            event("SCAN", Some("login:7f3c")).scene().as_deref(),
            Some("login:7f3c")
        );
        assert_eq!(
            event("scan", Some("qrscene_x")).scene().as_deref(),
            Some("qrscene_x")
        );
        assert_eq!(event("subscribe", Some("")).scene(), None);
        assert_eq!(event("subscribe", None).scene(), None);
        assert_eq!(event("subscribe", Some("qrscene_")).scene(), None);
        assert_eq!(event("subscribe", Some("last_trade_no_4200")).scene(), None);
        assert_eq!(event("SCAN", Some("")).scene(), None);
        assert_eq!(event("CLICK", Some("qrscene_x")).scene(), None);
        let message =
            parse("<xml><MsgType>text</MsgType><EventKey>qrscene_x</EventKey></xml>").unwrap();
        assert_eq!(message.scene(), None);
    }

    #[test]
    fn dedup_keys_follow_the_design() {
        let message = parse(
            "<xml><FromUserName>o1</FromUserName><MsgType>text</MsgType><MsgId>42</MsgId></xml>",
        )
        .unwrap();
        assert_eq!(message.dedup_key(), "msg|o1|42");
        let scan = parse(SCAN).unwrap();
        assert_eq!(scan.dedup_key(), "evt|oUser|1716999972|SCAN|login:7f3c|T1|");
        let template = parse(
            "<xml><FromUserName>o1</FromUserName><CreateTime>5</CreateTime><MsgType>event</MsgType>\
             <Event>TEMPLATESENDJOBFINISH</Event><MsgID>77</MsgID></xml>",
        )
        .unwrap();
        assert_eq!(template.dedup_key(), "evt|o1|5|TEMPLATESENDJOBFINISH|||77");
        for no_id in ["", "<MsgId></MsgId>"] {
            let message = parse(&format!(
                "<xml><FromUserName>o1</FromUserName><CreateTime>5</CreateTime><MsgType>device_text</MsgType>{no_id}</xml>"
            ))
            .unwrap();
            assert_eq!(message.dedup_key(), "evt|o1|5|device_text|||");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_xml_like_text(text in "[<>/!?\\[\\]a-zA-Z&;#x0-9 \"'=\\-]{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_mutated_pushes(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = SCAN.as_bytes().to_vec();
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            if let Ok(message) = Message::parse(&bytes) {
                // Whatever parses must be usable without panicking too.
                let _ = (message.fields_json(), message.kind(), message.scene(), message.dedup_key());
                prop_assert_eq!(message.fields_text(), message.fields_json().to_string());
            }
        }
    }
}
