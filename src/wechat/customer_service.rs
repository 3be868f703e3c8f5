//! A passive reply as the message it stands for, and that message in the
//! two shapes WeChat takes it: the Customer Service API's JSON (客服消息,
//! `POST /cgi-bin/message/custom/send`) and a passive reply's XML.
//!
//! A reply target writes passive reply XML. When its answer comes after
//! WeChat's five seconds, the relay keeps the message ([`LateMessage`]) and
//! sends it later: through the Customer Service API (allowed for 48 hours
//! after the user's last message), or as the passive reply to the user's
//! next push. The mapping, field by field (XML → JSON):
//!
//! | `MsgType` | reply XML | Customer Service JSON |
//! |---|---|---|
//! | text | `Content` | `text {content}` |
//! | image | `Image/MediaId` | `image {media_id}` |
//! | voice | `Voice/MediaId` | `voice {media_id}` |
//! | video | `Video/{MediaId, ThumbMediaId?, Title, Description}` | `video {media_id, thumb_media_id?, title, description}` |
//! | music | `Music/{Title, Description, MusicUrl, HQMusicUrl, ThumbMediaId}` | `music {title, description, musicurl, hqmusicurl, thumb_media_id}` |
//! | news | `Articles/item/{Title, Description, PicUrl, Url}` | `news {articles: [{title, description, url, picurl}]}`, the first article only |
//!
//! A passive video reply has no thumbnail: the Customer Service JSON
//! carries `thumb_media_id` only when the target's reply had one (a video's
//! own media id is no image, and WeChat would show a broken cover).
//! `transfer_customer_service` hands the conversation to a human
//! agent: it is no message, and has no late form.

use super::message::{cdata_element, Message, Node};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One message to a user, as a late reply keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msgtype", rename_all = "snake_case")]
pub enum LateMessage {
    Text {
        content: String,
    },
    Image {
        media_id: String,
    },
    Voice {
        media_id: String,
    },
    Video {
        media_id: String,
        /// The target's `ThumbMediaId`, when its reply had one: a passive
        /// video reply has no thumbnail, and none is made up.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thumb_media_id: Option<String>,
        title: String,
        description: String,
    },
    Music {
        title: String,
        description: String,
        music_url: String,
        hq_music_url: String,
        thumb_media_id: String,
    },
    News {
        articles: Vec<Article>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Article {
    pub title: String,
    pub description: String,
    pub pic_url: String,
    pub url: String,
}

/// Why a passive reply has no late form. Never quotes the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoLateForm {
    #[error("not reply XML")]
    NotXml,
    #[error("its MsgType is not one a message can be sent as")]
    MsgType,
    #[error("its {0} is missing")]
    Missing(&'static str),
}

impl LateMessage {
    /// The message a passive reply (plaintext XML, already judged fit for
    /// WeChat) stands for.
    pub fn from_reply(xml: &str) -> Result<LateMessage, NoLateForm> {
        let reply = Message::parse(xml.as_bytes()).map_err(|_| NoLateForm::NotXml)?;
        let text = |name: &'static str| reply.get(name).map(str::to_owned);
        let child = |outer: &'static str| children(&reply.fields, outer);
        Ok(match reply.msg_type() {
            Some("text") => LateMessage::Text {
                content: text("Content").ok_or(NoLateForm::Missing("Content"))?,
            },
            Some("image") => LateMessage::Image {
                media_id: media_id(child("Image"), "Image")?,
            },
            Some("voice") => LateMessage::Voice {
                media_id: media_id(child("Voice"), "Voice")?,
            },
            Some("video") => {
                let video = child("Video").ok_or(NoLateForm::Missing("Video"))?;
                LateMessage::Video {
                    media_id: media_id(Some(video), "Video")?,
                    thumb_media_id: Some(field(video, "ThumbMediaId")).filter(|t| !t.is_empty()),
                    title: field(video, "Title"),
                    description: field(video, "Description"),
                }
            }
            Some("music") => {
                let music = child("Music").ok_or(NoLateForm::Missing("Music"))?;
                LateMessage::Music {
                    title: field(music, "Title"),
                    description: field(music, "Description"),
                    music_url: field(music, "MusicUrl"),
                    hq_music_url: field(music, "HQMusicUrl"),
                    thumb_media_id: field(music, "ThumbMediaId"),
                }
            }
            Some("news") => LateMessage::News {
                articles: articles(child("Articles").ok_or(NoLateForm::Missing("Articles"))?),
            },
            _ => return Err(NoLateForm::MsgType),
        })
    }

    /// The `msgtype`, for logs and metrics.
    pub fn msg_type(&self) -> &'static str {
        match self {
            LateMessage::Text { .. } => "text",
            LateMessage::Image { .. } => "image",
            LateMessage::Voice { .. } => "voice",
            LateMessage::Video { .. } => "video",
            LateMessage::Music { .. } => "music",
            LateMessage::News { .. } => "news",
        }
    }

    /// The body of `POST /cgi-bin/message/custom/send` to `openid`.
    pub fn custom_send(&self, openid: &str) -> Value {
        let (msg_type, body) = match self {
            LateMessage::Text { content } => ("text", json!({ "content": content })),
            LateMessage::Image { media_id } => ("image", json!({ "media_id": media_id })),
            LateMessage::Voice { media_id } => ("voice", json!({ "media_id": media_id })),
            LateMessage::Video {
                media_id,
                thumb_media_id,
                title,
                description,
            } => {
                let mut video = json!({
                    "media_id": media_id,
                    "title": title,
                    "description": description,
                });
                if let Some(thumb) = thumb_media_id {
                    video["thumb_media_id"] = Value::from(thumb.as_str());
                }
                ("video", video)
            }
            LateMessage::Music {
                title,
                description,
                music_url,
                hq_music_url,
                thumb_media_id,
            } => (
                "music",
                json!({
                    "title": title,
                    "description": description,
                    "musicurl": music_url,
                    "hqmusicurl": hq_music_url,
                    "thumb_media_id": thumb_media_id,
                }),
            ),
            LateMessage::News { articles } => {
                // `custom/send` refuses more than one article (45008).
                let articles: Vec<Value> = articles
                    .iter()
                    .take(1)
                    .map(|a| {
                        json!({
                            "title": a.title,
                            "description": a.description,
                            "url": a.url,
                            "picurl": a.pic_url,
                        })
                    })
                    .collect();
                ("news", json!({ "articles": articles }))
            }
        };
        let mut message = serde_json::Map::new();
        message.insert("touser".into(), Value::from(openid));
        message.insert("msgtype".into(), Value::from(msg_type));
        message.insert(msg_type.into(), body);
        Value::Object(message)
    }

    /// The passive reply XML from `account` (its `gh_…` id) to `openid`.
    pub fn passive_reply(&self, openid: &str, account: &str, create_time: i64) -> String {
        let head = format!(
            "{}{}<CreateTime>{create_time}</CreateTime>{}",
            cdata_element("ToUserName", openid),
            cdata_element("FromUserName", account),
            cdata_element("MsgType", self.msg_type()),
        );
        let body = match self {
            LateMessage::Text { content } => cdata_element("Content", content),
            LateMessage::Image { media_id } => {
                format!("<Image>{}</Image>", cdata_element("MediaId", media_id))
            }
            LateMessage::Voice { media_id } => {
                format!("<Voice>{}</Voice>", cdata_element("MediaId", media_id))
            }
            LateMessage::Video {
                media_id,
                thumb_media_id,
                title,
                description,
            } => format!(
                "<Video>{}{}{}{}</Video>",
                cdata_element("MediaId", media_id),
                // Given back as the target wrote it.
                thumb_media_id
                    .as_deref()
                    .map_or_else(String::new, |t| cdata_element("ThumbMediaId", t)),
                cdata_element("Title", title),
                cdata_element("Description", description)
            ),
            LateMessage::Music {
                title,
                description,
                music_url,
                hq_music_url,
                thumb_media_id,
            } => format!(
                "<Music>{}{}{}{}{}</Music>",
                cdata_element("Title", title),
                cdata_element("Description", description),
                cdata_element("MusicUrl", music_url),
                cdata_element("HQMusicUrl", hq_music_url),
                cdata_element("ThumbMediaId", thumb_media_id)
            ),
            LateMessage::News { articles } => news_xml(articles),
        };
        format!("<xml>{head}{body}</xml>")
    }
}

fn news_xml(articles: &[Article]) -> String {
    let items: String = articles
        .iter()
        .map(|a| {
            format!(
                "<item>{}{}{}{}</item>",
                cdata_element("Title", &a.title),
                cdata_element("Description", &a.description),
                cdata_element("PicUrl", &a.pic_url),
                cdata_element("Url", &a.url)
            )
        })
        .collect();
    format!(
        "<ArticleCount>{}</ArticleCount><Articles>{items}</Articles>",
        articles.len()
    )
}

/// The children of the first top-level element called `name`.
fn children<'a>(fields: &'a [(String, Node)], name: &str) -> Option<&'a [(String, Node)]> {
    fields.iter().find_map(|(field, node)| match node {
        Node::Children(children) if field == name => Some(children.as_slice()),
        _ => None,
    })
}

/// The text of `name` among `fields`; empty when absent.
fn field(fields: &[(String, Node)], name: &str) -> String {
    fields
        .iter()
        .find_map(|(field, node)| match node {
            Node::Text(text) if field == name => Some(text.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn media_id(outer: Option<&[(String, Node)]>, name: &'static str) -> Result<String, NoLateForm> {
    let outer = outer.ok_or(NoLateForm::Missing(name))?;
    Some(field(outer, "MediaId"))
        .filter(|id| !id.is_empty())
        .ok_or(NoLateForm::Missing("MediaId"))
}

fn articles(items: &[(String, Node)]) -> Vec<Article> {
    items
        .iter()
        .filter_map(|(name, node)| match node {
            Node::Children(item) if name == "item" => Some(Article {
                title: field(item, "Title"),
                description: field(item, "Description"),
                pic_url: field(item, "PicUrl"),
                url: field(item, "Url"),
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "<ToUserName><![CDATA[o_user]]></ToUserName>\
        <FromUserName><![CDATA[gh_acct]]></FromUserName><CreateTime>1700000000</CreateTime>";

    fn reply(msg_type: &str, body: &str) -> String {
        format!("<xml>{HEAD}<MsgType><![CDATA[{msg_type}]]></MsgType>{body}</xml>")
    }

    /// Every passive reply type, as WeChat documents the reply XML, and the
    /// Customer Service JSON WeChat documents for the same message.
    #[test]
    fn every_passive_reply_type_maps_to_its_customer_service_json() {
        let table: Vec<(&str, &str, Value)> = vec![
            (
                "text",
                "<Content><![CDATA[你好 <b>&]]></Content>",
                json!({"touser": "o_user", "msgtype": "text", "text": {"content": "你好 <b>&"}}),
            ),
            (
                "image",
                "<Image><MediaId><![CDATA[img_1]]></MediaId></Image>",
                json!({"touser": "o_user", "msgtype": "image", "image": {"media_id": "img_1"}}),
            ),
            (
                "voice",
                "<Voice><MediaId><![CDATA[voice_1]]></MediaId></Voice>",
                json!({"touser": "o_user", "msgtype": "voice", "voice": {"media_id": "voice_1"}}),
            ),
            (
                "video",
                "<Video><MediaId><![CDATA[vid_1]]></MediaId><Title><![CDATA[T]]></Title>\
                 <Description><![CDATA[D]]></Description></Video>",
                json!({"touser": "o_user", "msgtype": "video", "video": {
                    "media_id": "vid_1", "title": "T", "description": "D"}}),
            ),
            // A thumbnail the target gave is carried; none is made up.
            (
                "video",
                "<Video><MediaId><![CDATA[vid_1]]></MediaId><ThumbMediaId><![CDATA[th_2]]></ThumbMediaId>\
                 <Title><![CDATA[T]]></Title><Description><![CDATA[D]]></Description></Video>",
                json!({"touser": "o_user", "msgtype": "video", "video": {
                    "media_id": "vid_1", "thumb_media_id": "th_2", "title": "T", "description": "D"}}),
            ),
            (
                "music",
                "<Music><Title><![CDATA[Song]]></Title><Description><![CDATA[By]]></Description>\
                 <MusicUrl><![CDATA[http://m/1.mp3]]></MusicUrl><HQMusicUrl><![CDATA[http://m/1.flac]]></HQMusicUrl>\
                 <ThumbMediaId><![CDATA[th_1]]></ThumbMediaId></Music>",
                json!({"touser": "o_user", "msgtype": "music", "music": {
                    "title": "Song", "description": "By", "musicurl": "http://m/1.mp3",
                    "hqmusicurl": "http://m/1.flac", "thumb_media_id": "th_1"}}),
            ),
            (
                "news",
                "<ArticleCount>1</ArticleCount><Articles>\
                 <item><Title><![CDATA[A]]></Title><Description><![CDATA[a]]></Description>\
                 <PicUrl><![CDATA[http://p/a.jpg]]></PicUrl><Url><![CDATA[http://u/a]]></Url></item>\
                 </Articles>",
                json!({"touser": "o_user", "msgtype": "news", "news": {"articles": [
                    {"title": "A", "description": "a", "url": "http://u/a", "picurl": "http://p/a.jpg"}]}}),
            ),
            // `custom/send` takes one article (45008 otherwise): the first.
            (
                "news",
                "<ArticleCount>2</ArticleCount><Articles>\
                 <item><Title><![CDATA[A]]></Title><Description><![CDATA[a]]></Description>\
                 <PicUrl><![CDATA[http://p/a.jpg]]></PicUrl><Url><![CDATA[http://u/a]]></Url></item>\
                 <item><Title><![CDATA[B]]></Title><Description><![CDATA[b]]></Description>\
                 <PicUrl><![CDATA[http://p/b.jpg]]></PicUrl><Url><![CDATA[http://u/b]]></Url></item>\
                 </Articles>",
                json!({"touser": "o_user", "msgtype": "news", "news": {"articles": [
                    {"title": "A", "description": "a", "url": "http://u/a", "picurl": "http://p/a.jpg"}]}}),
            ),
        ];
        for (msg_type, body, expected) in table {
            let message = LateMessage::from_reply(&reply(msg_type, body)).unwrap();
            assert_eq!(message.msg_type(), msg_type);
            assert_eq!(message.custom_send("o_user"), expected, "{msg_type}");
            // The same message as a passive reply reads back as itself.
            let again = message.passive_reply("o_user", "gh_acct", 1_700_000_001);
            assert_eq!(
                LateMessage::from_reply(&again).unwrap(),
                message,
                "{msg_type}"
            );
            // And it survives the spool's JSON.
            let stored = serde_json::to_string(&message).unwrap();
            assert_eq!(
                serde_json::from_str::<LateMessage>(&stored).unwrap(),
                message
            );
        }
    }

    #[test]
    fn a_reply_with_no_message_has_no_late_form() {
        let transfer = reply("transfer_customer_service", "");
        assert_eq!(LateMessage::from_reply(&transfer), Err(NoLateForm::MsgType));
        let no_media = reply("image", "<Image><MediaId></MediaId></Image>");
        assert_eq!(
            LateMessage::from_reply(&no_media),
            Err(NoLateForm::Missing("MediaId"))
        );
        assert_eq!(LateMessage::from_reply("not xml"), Err(NoLateForm::NotXml));
    }

    #[test]
    fn a_passive_reply_cannot_be_closed_early_by_its_text() {
        let message = LateMessage::Text {
            content: "a]]><MsgType>x</MsgType>".into(),
        };
        let xml = message.passive_reply("o", "gh", 1);
        assert_eq!(LateMessage::from_reply(&xml).unwrap(), message);
    }
}
