//! `wxrelay simulate`: sends a push to a running relay exactly as WeChat
//! would — the account's mode, its token's signatures, a fresh timestamp and
//! nonce — so an operator can see the whole path work before WeChat is
//! pointed at it. With `--verify-url` it sends WeChat's GET URL check instead.
//!
//! The XML of each kind follows what WeChat sends (the shapes of the
//! generated vectors); `wxrelay route` builds the same messages. Two events
//! of one kind sent within the same second are one event by WeChat's dedup
//! rules, and the relay answers the second without storing it.

use super::{CliError, Report};
use crate::clock::Clock;
use crate::config::{Account, Mode, Settings};
use crate::deliver::{self, HttpClient};
use crate::wechat::message::Message;
use crate::wechat::push::{self, digits, PushParams, Sealing};
use crate::wechat::{reply, signature};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use rand::Rng;
use std::fmt::{Display, Write as _};
use std::path::PathBuf;
use std::time::Duration;

/// How long the relay has to answer; WeChat itself waits 5 s.
const TIMEOUT: Duration = Duration::from_secs(10);
/// More than any answer WeChat would accept.
const MAX_ANSWER: usize = 64 * 1024;

pub const DEFAULT_TO: &str = "gh_000000000000";
/// Shaped like an OpenID (28 characters) and plainly not one.
pub const DEFAULT_FROM: &str = "oSimulatedUser00000000000000";
/// A parametric QR code's ticket, as WeChat shapes them.
const TICKET: &str = "gQH47joAAAAAAAAAAS5odHRwOi8vd2VpeGluLnFxLmNvbS9xLzAyU2ltdWxhdGVkAAIE";

/// The fields every push carries, whatever its kind.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MessageOptions {
    /// ToUserName: the account's original ID (`gh_` and 12 hex digits).
    #[arg(long, global = true, default_value = DEFAULT_TO)]
    pub to: String,
    /// FromUserName: the sender's OpenID (28 characters); also the query's `openid`.
    #[arg(long, global = true, default_value = DEFAULT_FROM)]
    pub from: String,
}

impl Default for MessageOptions {
    fn default() -> Self {
        Self {
            to: DEFAULT_TO.to_owned(),
            from: DEFAULT_FROM.to_owned(),
        }
    }
}

/// The pushes that can be built: WeChat's messages and the events an
/// Official Account server receives.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum PushKind {
    /// A text message.
    Text {
        /// The message text.
        #[arg(long, default_value = "hello")]
        content: String,
    },
    /// An image message.
    Image,
    /// A voice message.
    Voice,
    /// A video message.
    Video,
    /// A short video message.
    Shortvideo,
    /// A location message.
    Location,
    /// A link message.
    Link,
    /// A follow; with --scene, by scanning a parametric QR code (EventKey qrscene_SCENE).
    Subscribe {
        /// The QR code's scene: EventKey becomes qrscene_SCENE, with a Ticket.
        #[arg(long)]
        scene: Option<String>,
    },
    /// An unfollow.
    Unsubscribe,
    /// A follower scanning a parametric QR code (SCAN, EventKey SCENE).
    Scan {
        /// The QR code's scene: the EventKey.
        #[arg(long)]
        scene: String,
    },
    /// A menu click (CLICK).
    Click {
        /// The menu button's key.
        #[arg(long, default_value = "V1001_TODAY_MUSIC")]
        key: String,
    },
    /// A menu link opened (VIEW); the key is the URL.
    View {
        /// The menu link's URL.
        #[arg(long, default_value = "https://www.example.com/")]
        key: String,
    },
    /// A reported location (LOCATION).
    LocationEvent,
    /// A menu QR scan (scancode_push).
    ScancodePush,
    /// A template message's outcome (TEMPLATESENDJOBFINISH).
    Templatesendjobfinish,
    /// A mass send's outcome (MASSSENDJOBFINISH).
    Masssendjobfinish,
    /// A publication's outcome (PUBLISHJOBFINISH).
    Publishjobfinish,
    /// A subscription message popup's answer (subscribe_msg_popup_event).
    SubscribeMsgPopup,
}

/// What to send: a built message, or a file's XML as is.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Payload {
    #[command(flatten)]
    PushKind(PushKind),
    /// The message XML in a file, as is.
    Xml {
        /// A file holding one <xml>…</xml> message.
        #[arg(long)]
        file: PathBuf,
    },
}

impl Payload {
    /// The message XML, stamped `now` (unix seconds).
    pub fn xml(&self, opts: &MessageOptions, now: i64) -> Result<String, CliError> {
        match self {
            Payload::PushKind(kind) => Ok(message_xml(kind, opts, now, fresh_msg_id())),
            Payload::Xml { file } => std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display()))),
        }
    }
}

/// `wxrelay simulate`'s options, beside `--config`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SimulateArgs {
    /// The account, as configured; optional when there is only one.
    #[arg(long)]
    pub account: Option<String>,
    /// The relay's public base URL, e.g. http://127.0.0.1:8080 (/wx/ACCOUNT is added unless present).
    #[arg(long)]
    pub url: String,
    /// Send WeChat's GET URL check instead of a push.
    #[arg(long)]
    pub verify_url: bool,
    #[command(flatten)]
    pub message: MessageOptions,
    #[command(subcommand)]
    pub payload: Option<Payload>,
}

/// Sends the push (or the URL check) and reports the relay's answer. `ok`
/// when the relay answered 200 and, for a push, any reply envelope verifies
/// and decrypts.
pub async fn run(
    settings: &Settings,
    args: &SimulateArgs,
    clock: &dyn Clock,
) -> Result<Report, CliError> {
    let account = super::account(settings, args.account.as_deref())?;
    let url = push_url(&args.url, &account.id)?;
    let client = deliver::client();
    let now = clock.now_secs();
    if args.verify_url {
        return verify_url(&client, account, &url, now).await;
    }
    let payload = args.payload.as_ref().ok_or_else(|| {
        CliError::Usage("give a kind of push to send (text, scan, …) or --verify-url".to_owned())
    })?;
    let xml = payload.xml(&args.message, now)?;
    let openid = Message::parse(xml.as_bytes())
        .ok()
        .and_then(|m| m.from_user().map(str::to_owned));
    let nonce = digits(9);
    let random = reply::random_bytes();
    let envelope = PushParams {
        token: account.token.expose(),
        app_id: &account.app_id,
        timestamp: now,
        nonce: &nonce,
        openid: openid.as_deref(),
        random: &random,
    };
    let push = push::build(&xml, sealing(account)?, &envelope);

    let mut text = format!("POST {url} ({} mode)\n", account.mode.as_str());
    let uri = format!("{url}?{}", push.query);
    let (status, body) = exchange(&client, Method::POST, &uri, push.body).await?;
    let answer = String::from_utf8_lossy(&body);
    line(&mut text, format!("HTTP {status}"));
    line(&mut text, answer.trim_end());
    let mut ok = status == StatusCode::OK;
    if Message::parse(&body)
        .ok()
        .is_some_and(|m| m.get("Encrypt").is_some_and(|e| !e.is_empty()))
    {
        let (opened, report) = open_envelope(account, &body);
        ok &= opened;
        line(&mut text, report);
    }
    Ok(Report { text, ok })
}

/// The sealing the account's console mode implies, with its current key.
fn sealing(account: &Account) -> Result<Sealing<'_>, CliError> {
    let key = || {
        account.keys.as_ref().map(|k| &k.current).ok_or_else(|| {
            CliError::Usage(format!(
                "account {} has no encoding_aes_key for {} mode",
                account.id,
                account.mode.as_str()
            ))
        })
    };
    Ok(match account.mode {
        Mode::Plaintext => Sealing::Plaintext,
        Mode::Compat => Sealing::Compat(key()?),
        Mode::Secure => Sealing::Secure(key()?),
    })
}

/// Checks a reply envelope as WeChat would (see [`reply::open_envelope`]).
/// Says what it found.
fn open_envelope(account: &Account, body: &[u8]) -> (bool, String) {
    let keys = account.keys.as_ref();
    match reply::open_envelope(keys, account.token.expose(), &account.app_id, body) {
        Ok((xml, slot)) => (
            true,
            format!(
                "reply envelope: MsgSignature valid; decrypted with the {} key:\n{xml}",
                slot.as_str()
            ),
        ),
        Err(e) => (false, format!("reply envelope: INVALID: {e}")),
    }
}

async fn verify_url(
    client: &HttpClient,
    account: &Account,
    url: &url::Url,
    now: i64,
) -> Result<Report, CliError> {
    url_check(client, account.token.expose(), url, now).await
}

/// WeChat's GET URL check of `url`, signed with `token`: `ok` when the server
/// echoed `echostr`, which proves it holds the same Token.
pub async fn url_check(
    client: &HttpClient,
    token: &str,
    url: &url::Url,
    now: i64,
) -> Result<Report, CliError> {
    let (timestamp, nonce, echostr) = (now.to_string(), digits(9), digits(19));
    let signature = signature::sign(&[token, &timestamp, &nonce]);
    let separator = if url.query().is_some() { '&' } else { '?' };
    let uri = format!(
        "{url}{separator}signature={signature}&echostr={echostr}&timestamp={timestamp}&nonce={nonce}"
    );
    let (status, body) = exchange(client, Method::GET, &uri, String::new()).await?;
    let echoed = status == StatusCode::OK && body == echostr.as_bytes();
    let mut text = format!("GET {} (URL check)\n", crate::config::masked_url(url));
    line(&mut text, format!("HTTP {status}"));
    line(&mut text, printable(&String::from_utf8_lossy(&body)));
    line(
        &mut text,
        if echoed {
            "echostr echoed: WeChat would accept this server URL"
        } else {
            "echostr NOT echoed: WeChat would refuse this server URL"
        },
    );
    Ok(Report { text, ok: echoed })
}

/// A server's answer as it may be printed: control characters other than
/// line breaks and tabs escaped, so that a terminal shows them rather than
/// acts on them.
fn printable(text: &str) -> String {
    text.trim_end()
        .chars()
        .map(|c| match c {
            '\n' | '\t' => c.to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// One request with the overall timeout; the answer's status and body.
async fn exchange(
    client: &HttpClient,
    method: Method,
    uri: &str,
    body: String,
) -> Result<(StatusCode, Bytes), CliError> {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(CONTENT_TYPE, "text/xml")
        .header(
            USER_AGENT,
            concat!("wxrelay-simulate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| CliError::Usage(format!("cannot build a request to {uri}: {e}")))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| CliError::Failed(format!("cannot reach the relay: {}", chain(&e))))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| CliError::Failed(format!("cannot read the answer: {e}")))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| {
        CliError::Failed(format!(
            "no answer within {}",
            humantime::format_duration(TIMEOUT)
        ))
    })?
}

/// An error with its sources, which is where the client says what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// `base` with `/wx/{account}` appended, unless its path already ends so.
pub fn push_url(base: &str, account: &str) -> Result<url::Url, CliError> {
    let mut url =
        url::Url::parse(base).map_err(|e| CliError::Usage(format!("--url {base}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(CliError::Usage(format!(
            "--url {base}: must be http or https"
        )));
    }
    let suffix = format!("/wx/{account}");
    let path = url.path().trim_end_matches('/').to_owned();
    if !path.ends_with(&suffix) {
        url.set_path(&format!("{path}{suffix}"));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

fn line(text: &mut String, value: impl Display) {
    let _ = writeln!(text, "{value}");
}

/// A MsgId: 17 digits, like WeChat's (above 2^53, so never a JSON number).
pub fn fresh_msg_id() -> u64 {
    rand::thread_rng().gen_range(10_000_000_000_000_000..100_000_000_000_000_000)
}

/// The message XML WeChat would send for `kind`, created at `now` (unix
/// seconds); `msg_id` is the MsgId of messages and the MsgID of job events.
pub fn message_xml(kind: &PushKind, opts: &MessageOptions, now: i64, msg_id: u64) -> String {
    let head = |msg_type: &str| {
        vec![
            text("ToUserName", &opts.to),
            text("FromUserName", &opts.from),
            plain("CreateTime", now),
            text("MsgType", msg_type),
        ]
    };
    let message = |msg_type: &str, fields: &[String]| {
        let mut all = head(msg_type);
        all.extend_from_slice(fields);
        all.push(plain("MsgId", msg_id));
        all
    };
    let event = |name: &str, fields: &[String]| {
        let mut all = head("event");
        all.push(text("Event", name));
        all.extend_from_slice(fields);
        all
    };
    let media = |kind: &str| text("MediaId", &format!("SIMULATED_MEDIA_ID_{kind}"));
    let thumb = || text("ThumbMediaId", "SIMULATED_THUMB_MEDIA_ID");
    let lines = match kind {
        PushKind::Text { content } => message("text", &[text("Content", content)]),
        PushKind::Image => message(
            "image",
            &[
                text("PicUrl", "http://mmbiz.qpic.cn/mmbiz_jpg/simulated/0"),
                media("image"),
            ],
        ),
        PushKind::Voice => message("voice", &[media("voice"), text("Format", "amr")]),
        PushKind::Video => message("video", &[media("video"), thumb()]),
        PushKind::Shortvideo => message("shortvideo", &[media("shortvideo"), thumb()]),
        PushKind::Location => message("location", &location_fields()),
        PushKind::Link => message("link", &link_fields()),
        PushKind::Subscribe { scene: None } => event("subscribe", &[text("EventKey", "")]),
        PushKind::Subscribe { scene: Some(scene) } => event(
            "subscribe",
            &[
                text("EventKey", &format!("qrscene_{scene}")),
                text("Ticket", TICKET),
            ],
        ),
        PushKind::Unsubscribe => event("unsubscribe", &[text("EventKey", "")]),
        PushKind::Scan { scene } => {
            event("SCAN", &[text("EventKey", scene), text("Ticket", TICKET)])
        }
        PushKind::Click { key } => event("CLICK", &[text("EventKey", key)]),
        PushKind::View { key } => {
            event("VIEW", &[text("EventKey", key), plain("MenuId", 208396938)])
        }
        PushKind::LocationEvent => event("LOCATION", &location_event_fields()),
        PushKind::ScancodePush => event("scancode_push", &scancode_push_fields()),
        PushKind::Templatesendjobfinish => event(
            "TEMPLATESENDJOBFINISH",
            &[plain("MsgID", msg_id), text("Status", "success")],
        ),
        PushKind::Masssendjobfinish => event("MASSSENDJOBFINISH", &masssend_fields(msg_id)),
        PushKind::Publishjobfinish => event("PUBLISHJOBFINISH", &publish_fields(msg_id)),
        PushKind::SubscribeMsgPopup => {
            event("subscribe_msg_popup_event", &subscribe_msg_popup_fields())
        }
    };
    format!("<xml>{}\n</xml>", lines.join("\n"))
}

// The fields of the kinds that carry more than one or two, after the head
// (and, for an event, `Event`).

fn location_fields() -> [String; 4] {
    [
        plain("Location_X", "23.134521"),
        plain("Location_Y", "113.358803"),
        plain("Scale", 20),
        text("Label", "位置信息"),
    ]
}

fn link_fields() -> [String; 3] {
    [
        text("Title", "公众平台官网链接"),
        text("Description", "公众平台官网链接"),
        text("Url", "https://mp.weixin.qq.com/s/example"),
    ]
}

fn location_event_fields() -> [String; 3] {
    [
        plain("Latitude", "23.137466"),
        plain("Longitude", "113.352425"),
        plain("Precision", "119.385040"),
    ]
}

fn scancode_push_fields() -> [String; 2] {
    [
        text("EventKey", "rselfmenu_0_1"),
        format!(
            "<ScanCodeInfo>{}{}</ScanCodeInfo>",
            text("ScanType", "qrcode"),
            text("ScanResult", "https://example.com/q?x=1")
        ),
    ]
}

fn masssend_fields(msg_id: u64) -> [String; 7] {
    [
        plain("MsgID", msg_id),
        text("Status", "send success"),
        plain("TotalCount", 100),
        plain("FilterCount", 80),
        plain("SentCount", 80),
        plain("ErrorCount", 0),
        format!(
            "<CopyrightCheckResult>{}<ResultList></ResultList>{}</CopyrightCheckResult>",
            plain("Count", 0),
            plain("CheckState", 1)
        ),
    ]
}

fn publish_fields(msg_id: u64) -> [String; 1] {
    [format!(
        "<PublishEventInfo>{}{}{}<article_detail>{}<item>{}{}</item></article_detail></PublishEventInfo>",
        plain("publish_id", msg_id),
        plain("publish_status", 0),
        text("article_id", "SIMULATED_ARTICLE_ID"),
        plain("count", 1),
        plain("idx", 1),
        text("article_url", "https://mp.weixin.qq.com/s/example"),
    )]
}

fn subscribe_msg_popup_fields() -> [String; 1] {
    [format!(
        "<SubscribeMsgPopupEvent><List>{}{}{}</List></SubscribeMsgPopupEvent>",
        text("TemplateId", "SIMULATED_TEMPLATE_ID"),
        text("SubscribeStatusString", "accept"),
        plain("PopupScene", 2),
    )]
}

/// `<name><![CDATA[value]]></name>`, with any `]]>` in the value split across
/// two sections so it cannot end the first early.
fn text(name: &str, value: &str) -> String {
    let value = value.replace("]]>", "]]]]><![CDATA[>");
    format!("<{name}><![CDATA[{value}]]></{name}>")
}

/// `<name>value</name>`, for WeChat's unquoted numbers.
fn plain(name: &str, value: impl Display) -> String {
    format!("<{name}>{value}</{name}>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::message::MessageKind as Parsed;

    #[test]
    fn every_kind_parses_with_its_type_and_the_given_parties() {
        let opts = MessageOptions {
            to: "gh_0123456789ab".into(),
            from: "oAnotherUser0000000000000000".into(),
        };
        let kinds = [
            (
                PushKind::Text {
                    content: "a]]>b <c>".into(),
                },
                "text",
            ),
            (PushKind::Image, "image"),
            (PushKind::Voice, "voice"),
            (PushKind::Video, "video"),
            (PushKind::Shortvideo, "shortvideo"),
            (PushKind::Location, "location"),
            (PushKind::Link, "link"),
            (PushKind::Subscribe { scene: None }, "event/subscribe"),
            (PushKind::Unsubscribe, "event/unsubscribe"),
            (PushKind::Scan { scene: "s".into() }, "event/SCAN"),
            (PushKind::Click { key: "k".into() }, "event/CLICK"),
            (
                PushKind::View {
                    key: "https://e.com/".into(),
                },
                "event/VIEW",
            ),
            (PushKind::LocationEvent, "event/LOCATION"),
            (PushKind::ScancodePush, "event/scancode_push"),
            (
                PushKind::Templatesendjobfinish,
                "event/TEMPLATESENDJOBFINISH",
            ),
            (PushKind::Masssendjobfinish, "event/MASSSENDJOBFINISH"),
            (PushKind::Publishjobfinish, "event/PUBLISHJOBFINISH"),
            (
                PushKind::SubscribeMsgPopup,
                "event/subscribe_msg_popup_event",
            ),
        ];
        for (kind, expected) in kinds {
            let xml = message_xml(&kind, &opts, 1_717_000_000, 24602147850012345);
            let m = Message::parse(xml.as_bytes()).unwrap();
            let got = match m.kind() {
                Parsed::Message { msg_type } => {
                    assert_eq!(m.get("MsgId"), Some("24602147850012345"), "{xml}");
                    msg_type
                }
                Parsed::Event { event } => format!("event/{event}"),
            };
            assert_eq!(got, expected, "{xml}");
            assert_eq!(m.get("ToUserName"), Some("gh_0123456789ab"));
            assert_eq!(m.from_user(), Some("oAnotherUser0000000000000000"));
            assert_eq!(m.get("CreateTime"), Some("1717000000"));
        }
        let text = message_xml(
            &PushKind::Text {
                content: "a]]>b <c>".into(),
            },
            &opts,
            1,
            1,
        );
        assert_eq!(
            Message::parse(text.as_bytes()).unwrap().get("Content"),
            Some("a]]>b <c>")
        );
    }

    #[test]
    fn scenes_are_where_the_relay_reads_them() {
        let opts = MessageOptions::default();
        assert_eq!(DEFAULT_FROM.len(), 28);
        let scene = |kind| {
            Message::parse(message_xml(&kind, &opts, 1, 1).as_bytes())
                .unwrap()
                .scene()
        };
        assert_eq!(
            scene(PushKind::Subscribe {
                scene: Some("login_1".into())
            })
            .as_deref(),
            Some("login_1")
        );
        assert_eq!(scene(PushKind::Subscribe { scene: None }), None);
        assert_eq!(
            scene(PushKind::Scan {
                scene: "login_2".into()
            })
            .as_deref(),
            Some("login_2")
        );
    }

    #[test]
    fn push_urls() {
        let url = |base| push_url(base, "main").map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/wx/main"
        );
        assert_eq!(url("http://h/base/").unwrap(), "http://h/base/wx/main");
        assert_eq!(url("https://h/wx/main").unwrap(), "https://h/wx/main");
        assert_eq!(url("https://h/wx/main?x=1").unwrap(), "https://h/wx/main");
        assert!(url("ftp://h").is_err());
        assert!(url("not a url").is_err());
    }

    #[test]
    fn nonces_are_digits_of_the_asked_length() {
        for _ in 0..100 {
            let n = digits(9);
            assert_eq!(n.len(), 9);
            assert!(n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'));
        }
        assert_eq!(fresh_msg_id().to_string().len(), 17);
    }
}
