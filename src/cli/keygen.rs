//! `wxrelay keygen`: fresh credentials, printed as `relay.toml` lines, for a
//! new account of any kind (the same two values go into its console) or a
//! `format = "wechat"` target (they go into the broker's WeChat settings, so
//! the broker never holds the account's own). Every family takes the same
//! shape: letters and digits only, a Token of 3 to 32, an EncodingAESKey of
//! exactly 43.

use rand::distributions::Alphanumeric;
use rand::rngs::OsRng;
use rand::Rng;

/// The longest Token WeChat accepts: as much entropy as it allows.
const TOKEN_LEN: usize = 32;
/// 43 base64 characters carry the 32-byte AES key.
const KEY_LEN: usize = 43;

/// A Token and an EncodingAESKey drawn from the operating system's RNG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub token: String,
    pub encoding_aes_key: String,
}

pub fn generate() -> Credentials {
    let draw = |len| -> String {
        (0..len)
            .map(|_| char::from(OsRng.sample(Alphanumeric)))
            .collect()
    };
    Credentials {
        token: draw(TOKEN_LEN),
        // Any 43 letters and digits decode: base64 with the last 2 bits ignored.
        encoding_aes_key: draw(KEY_LEN),
    }
}

/// Where each kind's console takes the Token and the EncodingAESKey.
const CONSOLES: &str = "\
# For an account: paste the same values under [accounts.<id>] in relay.toml and into its console:\n\
#   official_account  mp.weixin.qq.com: 基本配置 → 服务器配置 (Token, EncodingAESKey)\n\
#   mini_program      mp.weixin.qq.com: 开发管理 → 开发设置 → 消息推送 (Token, EncodingAESKey)\n\
#   open_platform     open.weixin.qq.com: 第三方平台 → 开发资料 (消息校验Token, 消息加解密Key)\n\
#   wecom             work.weixin.qq.com: 应用管理 → the app → 接收消息 → 设置API接收 (Token, EncodingAESKey)\n\
# For a format = \"wechat\" target: into the broker's WeChat settings and under [targets.<name>].\n";

/// What `wxrelay keygen` prints.
pub fn run() -> String {
    let c = generate();
    format!(
        "{CONSOLES}token = \"{}\"\nencoding_aes_key = \"{}\"\n",
        c.token, c.encoding_aes_key
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::crypto::AesKey;

    #[test]
    fn keys_decode_and_tokens_are_alphanumeric() {
        for _ in 0..200 {
            let c = generate();
            assert_eq!(c.token.len(), TOKEN_LEN);
            assert!(c.token.bytes().all(|b| b.is_ascii_alphanumeric()));
            AesKey::from_encoding(&c.encoding_aes_key).unwrap();
        }
    }
}
