//! The pure protocol core against every test vector: the public ones taken from
//! independent implementations and WeChat's docs, and the generated ones
//! (`tests/fixtures/`). Each vector is run by its kind, and the counts are checked
//! so a vector of a new kind cannot be skipped silently.

use crate::common;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, KeyInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;
use std::collections::BTreeMap;
use wxrelay::wechat::crypto::{
    decrypt, decrypt_frame, encrypt, AesKey, DecryptError, KeyRing, KeySlot,
};
use wxrelay::wechat::message::{Message, MessageKind, XmlError};
use wxrelay::wechat::reply::{classify_reply, envelope, random_bytes, ReplyBody};
use wxrelay::wechat::signature::{sign, verify};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
    serde_json::from_str(&text).unwrap()
}

/// A string field that the vector must have.
fn s<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("missing string {key:?} in {value}"))
}

fn key(encoding: &str) -> AesKey {
    AesKey::from_encoding(encoding).unwrap()
}

fn encrypt_field(body: &str) -> String {
    Message::parse(body.as_bytes())
        .unwrap()
        .get("Encrypt")
        .expect("body has an Encrypt element")
        .to_owned()
}

/// How many bytes of PKCS#7 padding a ciphertext carries, from its length.
fn pad_of(encrypt_b64: &str, msg: &str, receive_id: &str) -> usize {
    STANDARD.decode(encrypt_b64).unwrap().len() - (20 + msg.len() + receive_id.len())
}

#[test]
fn public_vectors() {
    let file = fixture("public-vectors.json");
    let vectors = file["vectors"].as_array().unwrap();
    let mut in_file: BTreeMap<&str, usize> = BTreeMap::new();
    let mut handled: BTreeMap<&str, usize> = BTreeMap::new();

    for vector in vectors {
        let id = s(vector, "id");
        let kind = s(vector, "kind");
        *in_file.entry(kind).or_default() += 1;
        let input = &vector["input"];
        let expected = &vector["expected"];
        match kind {
            "sha1_sorted" => {
                let parts: Vec<&str> = input["parts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|part| part.as_str().unwrap())
                    .collect();
                assert_eq!(sign(&parts), s(expected, "signature"), "{id}");
            }
            "url_verify_plain" => {
                let parts = [s(input, "token"), s(input, "timestamp"), s(input, "nonce")];
                let valid = verify(s(input, "signature"), &parts);
                assert_eq!(Some(valid), expected["valid"].as_bool(), "{id}");
            }
            "aes_key" => {
                let bytes: Vec<u8> = expected["key_bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
                    .collect();
                assert_eq!(
                    key(s(input, "encoding_aes_key")).as_bytes().as_slice(),
                    bytes,
                    "{id}"
                );
            }
            "encrypt" => check_public_encrypt(id, input, expected),
            "decrypt" => check_public_decrypt(id, input, expected),
            "url_verify_encrypted" => {
                // WeCom's GET: echostr is ciphertext under a 4-part msg_signature.
                let encrypted = s(input, "encrypt");
                let parts = [
                    s(input, "token"),
                    s(input, "timestamp"),
                    s(input, "nonce"),
                    encrypted,
                ];
                let valid = verify(s(input, "msg_signature"), &parts);
                assert_eq!(Some(valid), expected["signature_valid"].as_bool(), "{id}");
                if valid {
                    let (msg, receive_id) =
                        decrypt_frame(&key(s(input, "encoding_aes_key")), encrypted).unwrap();
                    assert_eq!(msg, s(expected, "plaintext"), "{id}");
                    assert_eq!(receive_id, s(expected, "receive_id"), "{id}");
                    assert_eq!(receive_id, s(input, "corpid"), "{id}");
                }
            }
            other => panic!("{id}: no test for vector kind {other:?}"),
        }
        *handled.entry(kind).or_default() += 1;
    }
    assert_eq!(handled, in_file);
    assert_eq!(handled.values().sum::<usize>(), 25);
}

fn check_public_encrypt(id: &str, input: &Value, expected: &Value) {
    let aes_key = key(s(input, "encoding_aes_key"));
    let random: [u8; 16] = s(input, "random").as_bytes().try_into().unwrap();
    let plaintext = s(input, "plaintext");
    let receive_id = s(input, "receive_id");
    let encrypted = encrypt(&aes_key, &random, plaintext, receive_id);
    assert_eq!(encrypted, s(expected, "encrypt"), "{id}");
    assert_eq!(
        decrypt(&aes_key, &encrypted, receive_id).unwrap(),
        plaintext,
        "{id}"
    );

    if let Some(signature) = expected["msg_signature"].as_str() {
        let parts = [
            s(input, "token"),
            s(input, "timestamp"),
            s(input, "nonce"),
            &encrypted,
        ];
        assert_eq!(sign(&parts), signature, "{id}");
    }
    if let Some(expected_envelope) = expected["envelope"].as_str() {
        let built = envelope(
            &aes_key,
            s(input, "token"),
            receive_id,
            plaintext,
            s(input, "timestamp"),
            s(input, "nonce"),
            &random,
        );
        assert_eq!(built, expected_envelope, "{id}");
    }
}

fn check_public_decrypt(id: &str, input: &Value, expected: &Value) {
    let aes_key = key(s(input, "encoding_aes_key"));
    let encrypted = s(input, "encrypt");
    let token = input["token"].as_str();
    let (timestamp, nonce) = (input["timestamp"].as_str(), input["nonce"].as_str());

    if let Some(signature) = input["signature"].as_str() {
        let parts = [token.unwrap(), timestamp.unwrap(), nonce.unwrap()];
        assert!(verify(signature, &parts), "{id}: query signature");
    }
    if let Some(body) = input["body"].as_str() {
        assert_eq!(encrypt_field(body), encrypted, "{id}: Encrypt in the body");
    }
    // Without a published msg_signature (the access guide), only decryption is checkable.
    let signature_valid = match input["msg_signature"].as_str() {
        Some(msg_signature) => {
            let parts = [
                token.unwrap(),
                timestamp.unwrap(),
                nonce.unwrap(),
                encrypted,
            ];
            let valid = verify(msg_signature, &parts);
            assert_eq!(Some(valid), expected["signature_valid"].as_bool(), "{id}");
            valid
        }
        None => true,
    };
    if !signature_valid {
        return;
    }
    let plaintext = s(expected, "plaintext");
    let receive_id = s(expected, "receive_id");
    let (msg, got_receive_id) = decrypt_frame(&aes_key, encrypted).unwrap();
    assert_eq!(msg, plaintext, "{id}");
    assert_eq!(got_receive_id, receive_id, "{id}");
    assert_eq!(
        decrypt(&aes_key, encrypted, s(input, "appid")).unwrap(),
        plaintext,
        "{id}"
    );
    if let Some(pad) = expected["pad"].as_u64() {
        assert_eq!(pad_of(encrypted, plaintext, receive_id) as u64, pad, "{id}");
    }
    let message = Message::parse(plaintext.as_bytes()).unwrap();
    if let Some(fields) = expected["fields"].as_object() {
        for (name, value) in fields {
            assert_eq!(message.get(name), value.as_str(), "{id}: {name}");
        }
    }
}

/// The generated vectors' account.
struct Account {
    token: String,
    app_id: String,
    keys: KeyRing,
}

fn generated() -> (Value, Account) {
    let file = fixture("generated-vectors.json");
    let config = &file["config"];
    let keys = KeyRing {
        current: key(s(config, "encoding_aes_key")),
        previous: Some(key(s(config, "previous_encoding_aes_key"))),
    };
    assert_eq!(
        hex::encode(keys.current.as_bytes()),
        s(config, "aes_key_hex")
    );
    let account = Account {
        token: s(config, "token").to_owned(),
        app_id: s(config, "appid").to_owned(),
        keys,
    };
    (file, account)
}

/// Decrypts a request's body the way the relay does: signatures first, then
/// the key ring. Returns the decrypted XML, or the body itself in plaintext mode.
fn open_request(account: &Account, request: &Value) -> String {
    let query = &request["query"];
    let body = s(request, "body");
    let (timestamp, nonce) = (s(query, "timestamp"), s(query, "nonce"));
    assert!(verify(
        s(query, "signature"),
        &[&account.token, timestamp, nonce]
    ));
    let Some(msg_signature) = query["msg_signature"].as_str() else {
        return body.to_owned();
    };
    let encrypted = encrypt_field(body);
    assert!(verify(
        msg_signature,
        &[&account.token, timestamp, nonce, &encrypted]
    ));
    let (xml, _slot) = account.keys.decrypt(&encrypted, &account.app_id).unwrap();
    xml
}

#[test]
fn generated_positive_vectors() {
    let (file, account) = generated();
    let positive = file["positive"].as_array().unwrap();
    assert_eq!(
        positive.len() as u64,
        file["counts"]["positive"].as_u64().unwrap()
    );

    for vector in positive {
        let id = s(vector, "id");
        let expected = &vector["expected"];
        let plaintext = s(expected, "plaintext_xml");
        let message = Message::parse(plaintext.as_bytes()).unwrap();
        assert_eq!(message.root, "xml", "{id}");
        assert_eq!(
            message.fields_json(),
            common::expected_fields(expected),
            "{id}"
        );

        let classification = &expected["classification"];
        let expected_kind = match s(classification, "kind") {
            "message" => MessageKind::Message {
                msg_type: s(classification, "MsgType").to_owned(),
            },
            "event" => MessageKind::Event {
                event: s(classification, "Event").to_owned(),
            },
            other => panic!("{id}: unknown kind {other}"),
        };
        assert_eq!(message.kind(), expected_kind, "{id}");
        let expected_scene = classification["broker"]["scene"].as_str();
        assert_eq!(message.scene().as_deref(), expected_scene, "{id}");

        // What the relay recovers from the request is exactly the message.
        assert_eq!(
            open_request(&account, &vector["request"]),
            plaintext,
            "{id}"
        );
        if let Some(encrypted) = expected["encrypt"].as_str() {
            assert_eq!(
                encrypt_field(s(&vector["request"], "body")),
                encrypted,
                "{id}"
            );
            assert_eq!(
                decrypt(&account.keys.current, encrypted, &account.app_id).unwrap(),
                plaintext,
                "{id}"
            );
            let (_, slot) = account.keys.decrypt(encrypted, &account.app_id).unwrap();
            assert_eq!(slot, KeySlot::Current, "{id}");
            if let Some(pad) = expected["crypto"]["pkcs7_pad"].as_u64() {
                assert_eq!(
                    pad_of(encrypted, plaintext, &account.app_id) as u64,
                    pad,
                    "{id}"
                );
            }
        }
    }
}

#[test]
fn dedup_keys_partition_pushes_like_the_reference() {
    let (file, account) = generated();
    // (our key, the reference's recommended key, vector id)
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for vector in file["positive"].as_array().unwrap() {
        let message = Message::parse(s(&vector["expected"], "plaintext_xml").as_bytes()).unwrap();
        let reference = s(
            &vector["expected"]["classification"],
            "dedup_key_recommended",
        );
        keys.push((
            message.dedup_key(),
            reference.to_owned(),
            s(vector, "id").to_owned(),
        ));
    }

    let special = |id: &str| {
        file["special"]
            .as_array()
            .unwrap()
            .iter()
            .find(|vector| vector["id"] == id)
            .unwrap()
            .clone()
    };
    let keys_of = |vector: &Value| -> Vec<String> {
        vector["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|request| {
                Message::parse(open_request(&account, request).as_bytes())
                    .unwrap()
                    .dedup_key()
            })
            .collect()
    };

    let retry = special("special.retry_duplicate");
    let retry_keys = keys_of(&retry);
    assert_eq!(retry_keys.len(), 2);
    assert_eq!(retry_keys[0], retry_keys[1], "a retry is the same push");
    for key in retry_keys {
        let reference = s(&retry["expected"], "dedup_key_recommended").to_owned();
        keys.push((key, reference, "special.retry_duplicate".to_owned()));
    }
    let mismatch = special("special.compat_plaintext_mismatch");
    let message = Message::parse(s(&mismatch["expected"], "plaintext_xml").as_bytes()).unwrap();
    let reference = s(
        &mismatch["expected"]["classification"],
        "dedup_key_recommended",
    )
    .to_owned();
    keys.push((
        message.dedup_key(),
        reference,
        "special.compat_plaintext_mismatch".to_owned(),
    ));

    for (ours_a, reference_a, id_a) in &keys {
        for (ours_b, reference_b, id_b) in &keys {
            assert_eq!(
                ours_a == ours_b,
                reference_a == reference_b,
                "{id_a} vs {id_b}"
            );
        }
    }

    // Same user, same second, different events: WeChat's own key would collide.
    let same_second = special("special.same_second_different_events");
    let messages: Vec<Message> = same_second["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|request| Message::parse(open_request(&account, request).as_bytes()).unwrap())
        .collect();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].from_user(), messages[1].from_user());
    assert_eq!(messages[0].get("CreateTime"), messages[1].get("CreateTime"));
    assert_ne!(messages[0].dedup_key(), messages[1].dedup_key());
}

#[test]
fn generated_special_vectors() {
    let (file, account) = generated();
    let special = file["special"].as_array().unwrap();
    assert_eq!(
        special.len() as u64,
        file["counts"]["special"].as_u64().unwrap()
    );

    for vector in special {
        let id = s(vector, "id");
        let expected = &vector["expected"];
        match id {
            "special.compat_plaintext_mismatch" => {
                // Only Encrypt is signed: the relay must go by the decrypted copy.
                let request = &vector["request"];
                let outer = Message::parse(s(request, "body").as_bytes()).unwrap();
                let inner_xml = open_request(&account, request);
                assert_eq!(inner_xml, s(expected, "plaintext_xml"));
                let inner = Message::parse(inner_xml.as_bytes()).unwrap();
                let broker = &expected["classification"]["broker"];
                assert_eq!(inner.from_user(), broker["openid"].as_str());
                assert_eq!(inner.scene().as_deref(), broker["scene"].as_str());
                assert_eq!(inner.ticket(), broker["ticket"].as_str());
                assert_ne!(outer.from_user(), inner.from_user());
                assert_ne!(outer.scene(), inner.scene());
            }
            "special.key_rotation_previous_key" => {
                let encrypted = encrypt_field(s(&vector["request"], "body"));
                let (xml, slot) = account.keys.decrypt(&encrypted, &account.app_id).unwrap();
                assert_eq!(xml, s(expected, "plaintext_xml"));
                assert_eq!(slot, KeySlot::Previous);
                assert_eq!(s(expected, "decrypted_with"), slot.as_str());
                let current_only = KeyRing {
                    current: account.keys.current.clone(),
                    previous: None,
                };
                assert!(current_only.decrypt(&encrypted, &account.app_id).is_err());
            }
            "special.retry_duplicate" | "special.same_second_different_events" => {
                // Checked by dedup_keys_partition_pushes_like_the_reference.
                for request in vector["requests"].as_array().unwrap() {
                    Message::parse(open_request(&account, request).as_bytes()).unwrap();
                }
            }
            "special.pkcs7_pad_32" | "special.pkcs7_pad_1" => {
                let encrypted = encrypt_field(s(&vector["request"], "body"));
                let plaintext = s(expected, "plaintext_xml");
                assert_eq!(
                    open_request(&account, &vector["request"]),
                    plaintext,
                    "{id}"
                );
                let pad = expected["crypto"]["pkcs7_pad"].as_u64().unwrap();
                assert_eq!(
                    pad_of(&encrypted, plaintext, &account.app_id) as u64,
                    pad,
                    "{id}"
                );
            }
            "special.pretty_body_with_declaration" => {
                assert!(s(&vector["request"], "body").starts_with("<?xml"));
                assert_eq!(
                    open_request(&account, &vector["request"]),
                    s(expected, "plaintext_xml")
                );
            }
            other => panic!("no test for special vector {other}"),
        }
    }
}

/// The 16-byte random prefix of a frame: AES-CBC's first block, decrypted.
fn frame_random(key: &AesKey, encrypt_b64: &str) -> [u8; 16] {
    let raw = STANDARD.decode(encrypt_b64).unwrap();
    let mut block = GenericArray::clone_from_slice(&raw[..16]);
    aes::Aes256::new(GenericArray::from_slice(key.as_bytes())).decrypt_block(&mut block);
    std::array::from_fn(|i| block[i] ^ key.iv()[i])
}

#[test]
fn generated_reply_vectors() {
    let (file, account) = generated();
    let replies = file["replies"].as_array().unwrap();
    assert_eq!(
        replies.len() as u64,
        file["counts"]["reply"].as_u64().unwrap()
    );

    for vector in replies {
        match s(vector, "id") {
            "reply.encrypted_text" => {
                let body = s(vector, "reply_envelope_xml");
                let reply_xml = s(vector, "reply_plaintext_xml");
                let parsed = Message::parse(body.as_bytes()).unwrap();
                for (name, value) in vector["envelope_fields"].as_object().unwrap() {
                    assert_eq!(parsed.get(name), value.as_str(), "{name}");
                }
                let encrypted = parsed.get("Encrypt").unwrap();
                let (timestamp, nonce) = (
                    parsed.get("TimeStamp").unwrap(),
                    parsed.get("Nonce").unwrap(),
                );
                let signature = parsed.get("MsgSignature").unwrap();
                assert!(verify(
                    signature,
                    &[&account.token, timestamp, nonce, encrypted]
                ));
                assert_eq!(
                    decrypt(&account.keys.current, encrypted, &account.app_id).unwrap(),
                    reply_xml
                );
                assert_eq!(
                    classify_reply(body.as_bytes()),
                    Ok(ReplyBody::Envelope(body.to_owned()))
                );
                assert_eq!(
                    classify_reply(reply_xml.as_bytes()),
                    Ok(ReplyBody::PlainXml(reply_xml.to_owned()))
                );

                // With the same random prefix, our envelope is wechatpy's, byte for byte.
                let random = frame_random(&account.keys.current, encrypted);
                let key = &account.keys.current;
                let rebuilt = envelope(
                    key,
                    &account.token,
                    &account.app_id,
                    reply_xml,
                    timestamp,
                    nonce,
                    &random,
                );
                assert_eq!(rebuilt, body);

                // With a fresh prefix it still opens and verifies.
                let fresh = envelope(
                    key,
                    &account.token,
                    &account.app_id,
                    reply_xml,
                    timestamp,
                    nonce,
                    &random_bytes(),
                );
                let fresh_parsed = Message::parse(fresh.as_bytes()).unwrap();
                let fresh_encrypted = fresh_parsed.get("Encrypt").unwrap();
                let fresh_signature = fresh_parsed.get("MsgSignature").unwrap();
                assert!(verify(
                    fresh_signature,
                    &[&account.token, timestamp, nonce, fresh_encrypted]
                ));
                assert_eq!(
                    decrypt(key, fresh_encrypted, &account.app_id).unwrap(),
                    reply_xml
                );
            }
            "reply.ack" => {
                for body in vector["reply_body_any_of"].as_array().unwrap() {
                    let body = body.as_str().unwrap();
                    assert_eq!(
                        classify_reply(body.as_bytes()),
                        Ok(ReplyBody::Ack),
                        "{body:?}"
                    );
                }
            }
            other => panic!("no test for reply vector {other}"),
        }
    }
}

#[test]
fn generated_negative_vectors() {
    let (file, account) = generated();
    let negative = file["negative"].as_array().unwrap();
    assert_eq!(
        negative.len() as u64,
        file["counts"]["negative"].as_u64().unwrap()
    );

    for vector in negative {
        let id = s(vector, "id");
        let request = &vector["request"];
        let query = &request["query"];
        let body = request["body"].as_str().unwrap_or_default();
        // Whether msg_signature covers this body's Encrypt.
        let msg_signature_valid = || {
            let encrypted = encrypt_field(body);
            let parts = [
                account.token.as_str(),
                s(query, "timestamp"),
                s(query, "nonce"),
                &encrypted,
            ];
            verify(s(query, "msg_signature"), &parts)
        };
        let decrypt_error = || {
            let encrypted = encrypt_field(body);
            account
                .keys
                .decrypt(&encrypted, &account.app_id)
                .unwrap_err()
        };

        match id {
            "neg.bad_signature_plaintext" => {
                let parts = [
                    account.token.as_str(),
                    s(query, "timestamp"),
                    s(query, "nonce"),
                ];
                assert!(!verify(s(query, "signature"), &parts), "{id}");
            }
            "neg.bad_msg_signature" | "neg.encrypt_tampered" => {
                assert!(!msg_signature_valid(), "{id}")
            }
            // Signed correctly, so only the frame checks stand between them and the relay.
            "neg.wrong_appid" => {
                assert!(msg_signature_valid());
                assert_eq!(decrypt_error(), DecryptError::AppId);
                let (_, receive_id) =
                    decrypt_frame(&account.keys.current, &encrypt_field(body)).unwrap();
                assert_eq!(receive_id, s(&vector["expected"], "decrypted_appid"));
            }
            "neg.truncated_ciphertext" => {
                assert!(msg_signature_valid());
                assert_eq!(decrypt_error(), DecryptError::Length);
            }
            "neg.truncated_block_aligned" | "neg.unknown_aes_key" => {
                assert!(msg_signature_valid(), "{id}");
                let err = decrypt_error();
                assert!(
                    matches!(
                        err,
                        DecryptError::Padding
                            | DecryptError::Frame
                            | DecryptError::AppId
                            | DecryptError::Utf8
                    ),
                    "{id}: {err:?}"
                );
            }
            "neg.bad_padding_zero" | "neg.bad_padding_33" | "neg.bad_padding_inconsistent" => {
                assert!(msg_signature_valid(), "{id}");
                assert_eq!(decrypt_error(), DecryptError::Padding, "{id}");
            }
            "neg.msg_len_overflow" => {
                assert!(msg_signature_valid());
                assert_eq!(decrypt_error(), DecryptError::Frame);
            }
            "neg.non_base64_encrypt" => assert_eq!(decrypt_error(), DecryptError::Base64),
            "neg.non_utf8_plaintext" => {
                assert!(msg_signature_valid());
                assert_eq!(decrypt_error(), DecryptError::Utf8);
            }
            "neg.empty_encrypt" => {
                // Present but empty: the handler must treat it as missing.
                assert_eq!(
                    Message::parse(body.as_bytes()).unwrap().get("Encrypt"),
                    Some("")
                );
                assert_eq!(decrypt_error(), DecryptError::Length);
            }
            "neg.missing_encrypt_element" => {
                assert_eq!(
                    Message::parse(body.as_bytes()).unwrap().get("Encrypt"),
                    None
                );
            }
            "neg.malformed_xml" => {
                assert!(matches!(
                    Message::parse(body.as_bytes()),
                    Err(XmlError::Malformed(_))
                ));
            }
            "neg.xxe_external_entity" | "neg.entity_expansion" => {
                assert_eq!(
                    Message::parse(body.as_bytes()),
                    Err(XmlError::Doctype),
                    "{id}"
                );
            }
            "neg.xxe_inside_ciphertext" => {
                let inner = open_request(&account, request);
                assert!(inner.contains("<!DOCTYPE"));
                assert_eq!(Message::parse(inner.as_bytes()), Err(XmlError::Doctype));
            }
            // Request-level policy (size cap, freshness, accepted modes, required
            // parameters) is the handler's, not the protocol core's.
            "neg.oversized_body"
            | "neg.stale_timestamp"
            | "neg.future_timestamp"
            | "neg.downgrade_to_plaintext"
            | "neg.missing_signature" => {}
            other => panic!("no test for negative vector {other}"),
        }
    }
}
