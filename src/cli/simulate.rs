//! `wxrelay simulate`: sends a push to a running relay exactly as WeChat
//! would — the account's family and mode, its token's signatures, a fresh
//! timestamp and nonce — so an operator can see the whole path work before
//! WeChat is pointed at it. With `--verify-url` it sends the family's GET URL
//! check instead (WeCom's with an encrypted `echostr`).
//!
//! The XML of each kind follows what WeChat sends (the shapes of the
//! generated vectors); `wxrelay route` builds the same messages. A Mini
//! Program in JSON gets the same message as JSON, `CreateTime` and `MsgId`
//! as numbers; a WeCom app's carries its `AgentID`; an Open Platform's
//! authorisation events (`ticket`, `authorized`, …) go to its authorisation
//! URL and any message, for the authoriser `--appid` names, to its message
//! URL. Two events of one kind sent within the same second are one event by
//! WeChat's dedup rules, and the relay answers the second without storing it.

use super::{CliError, Report};
use crate::clock::Clock;
use crate::config::{Account, Mode, Settings};
use crate::deliver::{self, HttpClient};
use crate::wechat::crypto::encrypt;
use crate::wechat::family::{Codec, Family};
use crate::wechat::message::Message;
use crate::wechat::push::{self, digits, Push, PushParams, Sealing};
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
    #[command(flatten)]
    Authorization(Authorization),
}

/// An Open Platform's authorisation events, for its authorisation URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Authorization {
    /// An Open Platform's component_verify_ticket.
    Ticket,
    /// An Open Platform's authorisation by the account --appid names.
    Authorized,
    /// An Open Platform's authorisation withdrawn by the account --appid names.
    Unauthorized,
    /// An Open Platform's authorisation changed by the account --appid names.
    Updateauthorized,
}

impl PushKind {
    /// An Open Platform's authorisation event, for its authorisation URL.
    pub fn is_authorization_event(&self) -> bool {
        matches!(self, PushKind::Authorization(_))
    }
}

/// What the other families' pushes carry beside the message's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct FamilyOptions {
    /// Open Platform: the authoriser's AppID. A message goes to the message
    /// URL (/wx/ACCOUNT/APPID); `authorized` and the like name it as AuthorizerAppid.
    #[arg(long, global = true)]
    pub appid: Option<String>,
    /// WeCom: the app's AgentID [default: 1000002].
    #[arg(long, global = true)]
    pub agent_id: Option<String>,
}

/// The AgentID of a simulated WeCom push when none is given.
pub const DEFAULT_AGENT_ID: &str = "1000002";

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
        self.xml_with(opts, &FamilyOptions::default(), now)
    }

    /// The message XML with the family's fields from `family`.
    pub fn xml_with(
        &self,
        opts: &MessageOptions,
        family: &FamilyOptions,
        now: i64,
    ) -> Result<String, CliError> {
        match self {
            Payload::PushKind(kind) => Ok(family_xml(kind, opts, family, now, fresh_msg_id())),
            Payload::Xml { file } => std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display()))),
        }
    }

    fn is_authorization_event(&self) -> bool {
        matches!(self, Payload::PushKind(kind) if kind.is_authorization_event())
    }
}

/// What a push to `account` is built from: the message options with the
/// account's own addressee where none was given (a WeCom app's CorpID, an
/// Open Platform's AppID for its authorisation events), the family's fields,
/// and the authoriser whose message URL it goes to. Refuses what the
/// account's family has no place for.
pub fn plan(
    account: &Account,
    payload: &Payload,
    opts: &MessageOptions,
    family: &FamilyOptions,
) -> Result<(MessageOptions, FamilyOptions, Option<String>), CliError> {
    let usage = |text: String| Err(CliError::Usage(text));
    let authorization = payload.is_authorization_event();
    let mut opts = opts.clone();
    let mut family = family.clone();
    let own_addressee = account.kind == Family::Wecom || authorization;
    if opts.to == DEFAULT_TO && own_addressee {
        opts.to = account.app_id.clone();
    }
    let is_platform = account.kind == Family::OpenPlatform;
    if authorization && !is_platform {
        return usage(format!(
            "account {} is not an Open Platform (kind = \"open_platform\"): it gets no authorisation events",
            account.id
        ));
    }
    if family.appid.is_some() && !is_platform {
        return usage(format!(
            "--appid is for an Open Platform account, and {} is not one",
            account.id
        ));
    }
    if account.kind == Family::Wecom && family.agent_id.is_none() {
        family.agent_id = Some(DEFAULT_AGENT_ID.to_owned());
    }
    let authorizer = match (is_platform, authorization, &family.appid) {
        (true, false, None) => {
            return usage(
                "a message to an Open Platform is for an authoriser: give its --appid".to_owned(),
            )
        }
        (true, true, None)
            if !matches!(
                payload,
                Payload::PushKind(PushKind::Authorization(Authorization::Ticket))
            ) =>
        {
            return usage(
                "an authorisation event names the authoriser: give its --appid".to_owned(),
            )
        }
        (true, false, Some(appid)) => Some(appid.clone()),
        _ => None,
    };
    Ok((opts, family, authorizer))
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
    run_with(settings, args, &FamilyOptions::default(), clock).await
}

/// [`run`], with the other families' fields from `family`.
pub async fn run_with(
    settings: &Settings,
    args: &SimulateArgs,
    family: &FamilyOptions,
    clock: &dyn Clock,
) -> Result<Report, CliError> {
    let account = super::account(settings, args.account.as_deref())?;
    let client = deliver::client();
    let now = clock.now_secs();
    if args.verify_url {
        let url = push_url(&args.url, &account.id)?;
        return verify_url(&client, account, &url, now).await;
    }
    let payload = args.payload.as_ref().ok_or_else(|| {
        CliError::Usage("give a kind of push to send (text, scan, …) or --verify-url".to_owned())
    })?;
    let (opts, family, authorizer) = plan(account, payload, &args.message, family)?;
    let mut url = push_url(&args.url, &account.id)?;
    if let Some(appid) = &authorizer {
        url.set_path(&format!("{}/{appid}", url.path()));
    }
    let xml = payload.xml_with(&opts, &family, now)?;
    let push = seal(account, &xml, now)?;

    let mut text = format!(
        "POST {url} ({}, {} mode)\n",
        account.kind.as_str(),
        account.mode.as_str()
    );
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

/// `xml` sealed for `account` as WeChat seals its family's pushes, stamped
/// `now`: a Mini Program's in JSON when that is its data format.
fn seal(account: &Account, xml: &str, now: i64) -> Result<Push, CliError> {
    let openid = Message::parse(xml.as_bytes())
        .ok()
        .and_then(|m| m.from_user().map(str::to_owned))
        .filter(|_| account.kind != Family::Wecom);
    let nonce = digits(9);
    let random = reply::random_bytes();
    let params = PushParams {
        token: account.token.expose(),
        app_id: &account.app_id,
        timestamp: now,
        nonce: &nonce,
        openid: openid.as_deref(),
        random: &random,
    };
    Ok(match (account.kind, account.codec) {
        (Family::Wecom, _) => push::build_wecom(xml, key(account)?, &params),
        (_, Codec::Json) => push::build_json(&as_json(xml)?, sealing(account)?, &params),
        (_, Codec::Xml) => push::build(xml, sealing(account)?, &params),
    })
}

/// A message's XML as a Mini Program writes it in JSON: the same fields,
/// `CreateTime` and the message ids as numbers.
pub fn as_json(xml: &str) -> Result<String, CliError> {
    let message = Message::parse(xml.as_bytes())
        .map_err(|e| CliError::Usage(format!("the message is not WeChat XML: {e}")))?;
    let mut fields = message.fields_json();
    if let Some(object) = fields.as_object_mut() {
        for name in ["CreateTime", "MsgId", "MsgID"] {
            let number = object
                .get(name)
                .and_then(|v| v.as_str()?.parse::<u64>().ok());
            if let Some(number) = number {
                object.insert(name.to_owned(), number.into());
            }
        }
    }
    Ok(fields.to_string())
}

/// The sealing the account's console mode implies, with its current key.
fn sealing(account: &Account) -> Result<Sealing<'_>, CliError> {
    Ok(match account.mode {
        Mode::Plaintext => Sealing::Plaintext,
        Mode::Compat => Sealing::Compat(key(account)?),
        Mode::Secure => Sealing::Secure(key(account)?),
    })
}

/// The account's current key, which its mode needs.
fn key(account: &Account) -> Result<&crate::wechat::crypto::AesKey, CliError> {
    account.keys.as_ref().map(|k| &k.current).ok_or_else(|| {
        CliError::Usage(format!(
            "account {} has no encoding_aes_key for {} mode",
            account.id,
            account.mode.as_str()
        ))
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
    if account.kind != Family::Wecom {
        return url_check(client, account.token.expose(), url, now).await;
    }
    // WeCom's: echostr encrypted for the CorpID, signed with msg_signature.
    let (timestamp, nonce, echo) = (now.to_string(), digits(9), digits(19));
    let echostr = encrypt(
        key(account)?,
        &reply::random_bytes(),
        &echo,
        &account.app_id,
    );
    let msg_signature = signature::sign(&[account.token.expose(), &timestamp, &nonce, &echostr]);
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("msg_signature", msg_signature.as_str()),
            ("timestamp", &timestamp),
            ("nonce", &nonce),
            ("echostr", &echostr),
        ])
        .finish();
    echo_check(client, url, &query, &echo).await
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
    let query =
        format!("signature={signature}&echostr={echostr}&timestamp={timestamp}&nonce={nonce}");
    echo_check(client, url, &query, &echostr).await
}

/// A URL check of `url` with `query`: `ok` when the server answered
/// `expected`, the whole body.
async fn echo_check(
    client: &HttpClient,
    url: &url::Url,
    query: &str,
    expected: &str,
) -> Result<Report, CliError> {
    let separator = if url.query().is_some() { '&' } else { '?' };
    let uri = format!("{url}{separator}{query}");
    let (status, body) = exchange(client, Method::GET, &uri, String::new()).await?;
    let echoed = status == StatusCode::OK && body == expected.as_bytes();
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
    family_xml(kind, opts, &FamilyOptions::default(), now, msg_id)
}

/// [`message_xml`] with the family's fields: a WeCom push's `AgentID`, the
/// authoriser an authorisation event names (its `AppId` is `opts.to`).
pub fn family_xml(
    kind: &PushKind,
    opts: &MessageOptions,
    family: &FamilyOptions,
    now: i64,
    msg_id: u64,
) -> String {
    let authorizer = family.appid.as_deref().unwrap_or("wx0000000000000000");
    let xml = xml_of(kind, opts, authorizer, now, msg_id);
    match &family.agent_id {
        Some(agent_id) if !kind.is_authorization_event() => {
            let agent = plain("AgentID", agent_id);
            xml.replacen("\n</xml>", &format!("\n{agent}\n</xml>"), 1)
        }
        _ => xml,
    }
}

/// An Open Platform's authorisation event: `AppId` (the platform's),
/// `CreateTime`, `InfoType` and what that kind of event carries.
fn authorization_xml(
    kind: Authorization,
    opts: &MessageOptions,
    authorizer: &str,
    now: i64,
    msg_id: u64,
) -> String {
    let grant = |info_type: &str| {
        vec![
            text("InfoType", info_type),
            text("AuthorizerAppid", authorizer),
            text(
                "AuthorizationCode",
                &format!("queryauthcode@@@SIMULATED{msg_id}"),
            ),
            plain("AuthorizationCodeExpiredTime", now + 3600),
            text("PreAuthCode", &format!("preauthcode@@@SIMULATED{msg_id}")),
        ]
    };
    let fields = match kind {
        Authorization::Authorized => grant("authorized"),
        Authorization::Updateauthorized => grant("updateauthorized"),
        Authorization::Unauthorized => vec![
            text("InfoType", "unauthorized"),
            text("AuthorizerAppid", authorizer),
        ],
        Authorization::Ticket => vec![
            text("InfoType", "component_verify_ticket"),
            text(
                "ComponentVerifyTicket",
                &format!("ticket@@@SIMULATED{msg_id}"),
            ),
        ],
    };
    let head = [text("AppId", &opts.to), plain("CreateTime", now)];
    format!("<xml>{}\n{}\n</xml>", head.join("\n"), fields.join("\n"))
}

/// The fields every push of a user carries: ToUserName, FromUserName,
/// CreateTime and MsgType.
struct Head<'a> {
    opts: &'a MessageOptions,
    now: i64,
    msg_id: u64,
}

impl Head<'_> {
    fn of(&self, msg_type: &str) -> Vec<String> {
        vec![
            text("ToUserName", &self.opts.to),
            text("FromUserName", &self.opts.from),
            plain("CreateTime", self.now),
            text("MsgType", msg_type),
        ]
    }

    /// A user's message: its fields, then its MsgId.
    fn message(&self, msg_type: &str, fields: &[String]) -> Vec<String> {
        let mut all = self.of(msg_type);
        all.extend_from_slice(fields);
        all.push(plain("MsgId", self.msg_id));
        all
    }

    /// An event: its Event, then its fields.
    fn event(&self, name: &str, fields: &[String]) -> Vec<String> {
        let mut all = self.of("event");
        all.push(text("Event", name));
        all.extend_from_slice(fields);
        all
    }
}

/// A message's or an event's XML, as an Official Account gets it, or an
/// Open Platform's authorisation event naming `authorizer`.
fn xml_of(
    kind: &PushKind,
    opts: &MessageOptions,
    authorizer: &str,
    now: i64,
    msg_id: u64,
) -> String {
    let head = Head { opts, now, msg_id };
    let (message, event) = (
        |t, f: &[String]| head.message(t, f),
        |n, f: &[String]| head.event(n, f),
    );
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
        PushKind::Authorization(kind) => {
            return authorization_xml(*kind, opts, authorizer, now, msg_id)
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

fn text(name: &str, value: &str) -> String {
    crate::wechat::message::cdata_element(name, value)
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
