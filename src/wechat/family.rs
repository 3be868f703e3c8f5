//! WeChat's callback families, side by side. Official Accounts, Mini Programs,
//! Open Platform third-party platforms and WeCom apps each have one server URL
//! and the same crypto ([`crate::wechat::crypto`]: the AES frame and its
//! receive id); what differs is how the URL is checked, how a push's body is
//! written, whose receive id ends the frame, and what WeChat takes back:
//!
//! | | URL check (GET) | Body | Receive id | Answer |
//! |---|---|---|---|---|
//! | Official Account | `signature` over (token, timestamp, nonce); `echostr` echoed as is | XML | its AppID | `success`, or a passive reply (sealed in secure mode) |
//! | Mini Program | the same | XML or JSON, as its console's data format (数据格式) says | its AppID | `success` |
//! | Open Platform | the same, with the platform's Token | XML, always encrypted | the platform's component AppID, for every authoriser | `success` to an authorisation event; to a message as an Official Account's |
//! | WeCom | `msg_signature` over (token, timestamp, nonce, echostr); `echostr` is encrypted: decrypted, its receive id checked, the plaintext answered exactly, within 1 s | `<xml><ToUserName/><AgentID/><Encrypt/></xml>`, always encrypted, under a query of `msg_signature`, `timestamp` and `nonce` only | the CorpID (a self-built app) or SuiteID (a suite) | `success`, or a sealed passive reply |
//!
//! An Open Platform has two URLs. Its authorisation URL, `/wx/{account}`,
//! takes the authorisation events: `component_verify_ticket` every 10
//! minutes, `authorized`, `unauthorized`, `updateauthorized`; they carry
//! `AppId` (the platform's) and `InfoType` instead of `ToUserName` and
//! `MsgType`. Its message URL is entered as `https://host/wx/{account}/$APPID$`
//! and WeChat puts the authoriser's AppID in place of `$APPID$`: every
//! authorised account's pushes arrive there, sealed with the platform's
//! Token and key, and only the path says whose they are.
//!
//! What was verified about a push beyond its message travels with it as its
//! [`Origin`]; everything after verification is the same for every family.

use super::message::Message;

/// A callback family: what `kind` an account is in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// 公众号 / 服务号: today's protocol, the default.
    OfficialAccount,
    /// 小程序 / 小游戏: an Official Account's protocol, XML or JSON, no replies.
    MiniProgram,
    /// 第三方平台: pushes for every authorised account at one URL.
    OpenPlatform,
    /// 企业微信 app: an encrypted URL check, a CorpID or SuiteID as receive id.
    Wecom,
}

impl Family {
    pub const ALL: [Family; 4] = [
        Family::OfficialAccount,
        Family::MiniProgram,
        Family::OpenPlatform,
        Family::Wecom,
    ];

    /// The configuration's name, the `json` format's and the logs'.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::OfficialAccount => "official_account",
            Family::MiniProgram => "mini_program",
            Family::OpenPlatform => "open_platform",
            Family::Wecom => "wecom",
        }
    }
}

/// How a push's body and message are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    #[default]
    Xml,
    /// A Mini Program's JSON ([`crate::wechat::json`]).
    Json,
}

impl Codec {
    pub const ALL: [Codec; 2] = [Codec::Xml, Codec::Json];

    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Xml => "xml",
            Codec::Json => "json",
        }
    }

    /// What a body in this codec is sent as.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Xml => "text/xml",
            Codec::Json => "application/json",
        }
    }
}

/// What was verified about a push beyond its message: the family, the codec,
/// and the family's identifiers. Each identifier is one the family
/// authenticates: the authoriser's AppID is in a path under the platform's
/// signature, the AgentID and InfoType in the decrypted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub family: Family,
    pub codec: Codec,
    /// Open Platform: the authoriser whose push came in at the message URL.
    pub appid: Option<String>,
    /// WeCom: the app's `AgentID`.
    pub agent_id: Option<String>,
    /// Open Platform: an authorisation event's `InfoType`.
    pub info_type: Option<String>,
}

impl Default for Origin {
    /// An Official Account's XML push.
    fn default() -> Self {
        Origin::of(Family::OfficialAccount, Codec::Xml)
    }
}

impl Origin {
    /// A push of `family` in `codec`, with no identifiers yet.
    pub fn of(family: Family, codec: Codec) -> Origin {
        Origin {
            family,
            codec,
            appid: None,
            agent_id: None,
            info_type: None,
        }
    }

    /// What the dedup key holds beside the account and the message's own
    /// key. An Open Platform's authorisers share its URL, and their users'
    /// pushes can carry the same `MsgId`s, so the authoriser is part of the
    /// key; a WeCom suite's callback gets every corporation's pushes (the
    /// corporation is `ToUserName`), each app its `AgentID`. `None` for the
    /// families with one sender of pushes per account, whose keys stay as
    /// they always were.
    pub fn dedup_scope(&self, message: &Message) -> Option<String> {
        match self.family {
            Family::OfficialAccount | Family::MiniProgram => None,
            Family::OpenPlatform => Some(self.appid.clone().unwrap_or_default()),
            Family::Wecom => Some(format!(
                "{}/{}",
                message.get("ToUserName").unwrap_or_default(),
                self.agent_id.as_deref().unwrap_or_default()
            )),
        }
    }

    /// Whether WeChat takes a passive reply to this push: a Mini Program
    /// answers `success` (its passive replies are all but gone), and so does
    /// an Open Platform to an authorisation event.
    pub fn takes_reply(&self) -> bool {
        match self.family {
            Family::OfficialAccount | Family::Wecom => true,
            Family::MiniProgram => false,
            Family::OpenPlatform => self.info_type.is_none(),
        }
    }
}

/// The `InfoType` of the push that brings an Open Platform its
/// `component_verify_ticket`, every 10 minutes.
pub const TICKET_INFO_TYPE: &str = "component_verify_ticket";

/// An AppID as WeChat issues them: `wx` and 16 hex digits.
pub fn is_app_id(text: &str) -> bool {
    text.strip_prefix("wx")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids_are_wx_and_sixteen_hex_digits() {
        assert!(is_app_id("wx5f3c9a1e7d2b4c60"));
        for not in [
            "$APPID$",
            "wx5f3c9a1e7d2b4c6",
            "wx5f3c9a1e7d2b4c6g",
            "gh_5f3c9a1e7d2b",
            "",
        ] {
            assert!(!is_app_id(not), "{not}");
        }
    }

    #[test]
    fn only_shared_urls_scope_their_dedup_keys() {
        let m = Message::parse(b"<xml><ToUserName>ww1</ToUserName></xml>").unwrap();
        assert_eq!(Origin::default().dedup_scope(&m), None);
        let mut op = Origin::of(Family::OpenPlatform, Codec::Xml);
        op.appid = Some("wx0000000000000001".into());
        assert_eq!(op.dedup_scope(&m).as_deref(), Some("wx0000000000000001"));
        let mut wecom = Origin::of(Family::Wecom, Codec::Xml);
        wecom.agent_id = Some("1000002".into());
        assert_eq!(wecom.dedup_scope(&m).as_deref(), Some("ww1/1000002"));
    }

    #[test]
    fn mini_programs_and_authorisation_events_take_no_reply() {
        assert!(Origin::default().takes_reply());
        assert!(!Origin::of(Family::MiniProgram, Codec::Json).takes_reply());
        let mut op = Origin::of(Family::OpenPlatform, Codec::Xml);
        assert!(op.takes_reply());
        op.info_type = Some("component_verify_ticket".into());
        assert!(!op.takes_reply());
    }
}
