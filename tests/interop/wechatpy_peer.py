"""An independent WeChat implementation (wechatpy) on both sides of the relay.

As the broker, it serves each `format = "wechat"` target: it checks the
signature, decrypts with the target's credentials as any WeChat server built
on wechatpy would, parses the message, records what it got, and answers
`success`, an encrypted reply or a plaintext reply. As "WeChat", it opens the
relay's answers with the account's credentials, and builds the pushes and URL
checks of every callback family with wechatpy's own crypto: WeCom's with
`wechatpy.enterprise.crypto.WeChatCrypto`, the Open Platform's and a Mini
Program's XML with `wechatpy.crypto.WeChatCrypto`, a Mini Program's JSON
(which wechatpy has no class for) with its primitives, `PrpCrypto` and the
signature.

    python wechatpy_peer.py CONFIG_JSON

CONFIG_JSON: {"targets": {NAME: {"token", "encoding_aes_key", "app_id"[, "family"]}},
              "accounts": {NAME: {"token", "encoding_aes_key", "app_id"[, "family"]}}}

A "family" of "wecom" reads and seals with WeCom's crypto ("app_id" is then
the CorpID), "json" reads a Mini Program's JSON; the default is XML.

Prints "listening PORT" once ready, then serves until killed:

    GET  /broker/TARGET[/…]?signature&timestamp&nonce&echostr  the URL check
    POST /broker/TARGET/REPLY[/…]?...  a delivery; REPLY: none | encrypted | plaintext
    POST /wechat/ACCOUNT?timestamp&nonce   open the relay's answer as WeChat
    POST /build                            a push or URL check, built (JSON in and out)
    GET  /results                          every delivery's record, as JSON
"""

import json
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import xmltodict
from wechatpy import parse_message
from wechatpy.component import (COMPONENT_MESSAGE_TYPES, ComponentUnknownMessage,
                                WeChatComponent)
from wechatpy.crypto import PrpCrypto, WeChatCrypto, _get_signature
from wechatpy.enterprise import parse_message as parse_wecom_message
from wechatpy.enterprise.crypto import WeChatCrypto as WeComCrypto
from wechatpy.exceptions import InvalidSignatureException
from wechatpy.replies import create_reply
from wechatpy.utils import check_signature, to_text

CONFIG = json.loads(sys.argv[1])
RESULTS = []
LOCK = threading.Lock()


def crypto(creds):
    if creds.get("family") == "wecom":
        return WeComCrypto(creds["token"], creds["encoding_aes_key"], creds["app_id"])
    return WeChatCrypto(creds["token"], creds["encoding_aes_key"], creds["app_id"])


def envelope(creds, message, nonce, timestamp):
    """wechatpy's sealed envelope of `message`: its Encrypt and MsgSignature."""
    sealed = xmltodict.parse(crypto(creds).encrypt_message(message, nonce, timestamp))["xml"]
    return sealed["Encrypt"], sealed["MsgSignature"]


def signature(token, timestamp, nonce):
    return _get_signature(token, timestamp, nonce, "")


def build(spec):
    """A push (or a URL check) of spec["family"], built as WeChat would."""
    creds = {"token": spec["token"], "encoding_aes_key": spec["encoding_aes_key"],
             "app_id": spec["receive_id"], "family": spec["family"]}
    ts, nonce, family = spec["timestamp"], spec["nonce"], spec["family"]
    if "echo" in spec:
        if family == "wecom":
            encrypt, msg_signature = envelope(creds, spec["echo"], nonce, ts)
            query = [("msg_signature", msg_signature), ("timestamp", ts), ("nonce", nonce),
                     ("echostr", encrypt)]
        else:
            query = [("signature", signature(spec["token"], ts, nonce)), ("timestamp", ts),
                     ("nonce", nonce), ("echostr", spec["echo"])]
        return {"query": urlencode(query), "body": ""}
    message = spec["message"]
    if family == "wecom":
        encrypt, msg_signature = envelope(creds, message, nonce, ts)
        fields = xmltodict.parse(message)["xml"]
        body = ("<xml><ToUserName><![CDATA[%s]]></ToUserName><AgentID><![CDATA[%s]]></AgentID>"
                "<Encrypt><![CDATA[%s]]></Encrypt></xml>") % (
                    fields["ToUserName"], fields["AgentID"], encrypt)
        query = [("msg_signature", msg_signature), ("timestamp", ts), ("nonce", nonce)]
        return {"query": urlencode(query), "body": body}
    query = [("signature", signature(spec["token"], ts, nonce)), ("timestamp", ts),
             ("nonce", nonce)]
    if spec.get("openid"):
        query.append(("openid", spec["openid"]))
    if spec["mode"] == "plaintext":
        return {"query": urlencode(query), "body": message}
    if spec.get("codec") == "json":
        # No wechatpy class reads or writes JSON pushes: its frame and signature do.
        encrypt = to_text(PrpCrypto(crypto(creds).key).encrypt(message, spec["receive_id"]))
        msg_signature = _get_signature(spec["token"], ts, nonce, encrypt)
        fields = json.loads(message, object_pairs_hook=OrderedDict)
        if spec["mode"] == "secure":
            fields = OrderedDict([("ToUserName", fields["ToUserName"])])
        fields["Encrypt"] = encrypt
        body = json.dumps(fields, ensure_ascii=False)
    else:
        encrypt, msg_signature = envelope(creds, message, nonce, ts)
        if spec["mode"] == "secure":
            fields = xmltodict.parse(message)["xml"]
            name = "ToUserName" if "ToUserName" in fields else "AppId"
            body = "<xml><%s><![CDATA[%s]]></%s><Encrypt><![CDATA[%s]]></Encrypt></xml>" % (
                name, fields[name], name, encrypt)
        else:
            body = message.replace("</xml>", "<Encrypt><![CDATA[%s]]></Encrypt></xml>" % encrypt)
    query += [("encrypt_type", "aes"), ("msg_signature", msg_signature)]
    return {"query": urlencode(query), "body": body}


def record(entry):
    with LOCK:
        RESULTS.append(entry)


class Peer(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="text/plain; charset=utf-8"):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def parts(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        return [p for p in url.path.split("/") if p], query

    def do_GET(self):
        path, query = self.parts()
        if path == ["results"]:
            with LOCK:
                return self.answer(200, json.dumps(RESULTS), "application/json")
        if len(path) >= 2 and path[0] == "broker":
            creds = CONFIG["targets"][path[1]]
            try:
                check_signature(creds["token"], query.get("signature", ""),
                                query.get("timestamp", ""), query.get("nonce", ""))
            except InvalidSignatureException:
                return self.answer(403, "bad signature")
            return self.answer(200, query.get("echostr", ""))
        self.answer(404, "not found")

    def body(self):
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length).decode("utf-8")

    def do_POST(self):
        path, query = self.parts()
        body = self.body()
        if len(path) >= 3 and path[0] == "broker":
            return self.broker(path[1], path[2], query, body, path[3:])
        if len(path) == 2 and path[0] == "wechat":
            return self.wechat(path[1], body)
        if path == ["build"]:
            try:
                built = build(json.loads(body))
            except Exception as e:
                return self.answer(422, "%s: %s" % (type(e).__name__, e))
            return self.answer(200, json.dumps(built), "application/json")
        self.answer(404, "not found")

    def broker(self, target, reply, query, body, rest):
        creds = CONFIG["targets"][target]
        entry = {"target": target, "query": query, "path": rest}
        try:
            xml, message = self.open_delivery(creds, query, body)
        except Exception as e:  # every failure is a finding, recorded as such
            entry.update(ok=False, error="%s: %s" % (type(e).__name__, e))
            record(entry)
            return self.answer(403, "refused")
        entry.update(ok=True, xml=xml, type=message.type,
                     event=getattr(message, "event", None))
        if message.type == "component_verify_ticket":
            # As a platform's backend built on wechatpy takes it in.
            component = WeChatComponent(creds["app_id"], "secret", creds["token"],
                                        creds["encoding_aes_key"])
            component.parse_message(body, query["msg_signature"], query["timestamp"],
                                    query["nonce"])
            entry["ticket"] = component.session.get("component_verify_ticket")
        record(entry)
        if reply == "none":
            return self.answer(200, "success")
        text = "echo %s from %s" % (message.type, target)
        rendered = create_reply(text, message, render=True)
        if reply == "encrypted":
            rendered = crypto(creds).encrypt_message(rendered, query["nonce"], query["timestamp"])
        self.answer(200, rendered, "application/xml")

    def open_delivery(self, creds, query, body):
        """The message of a delivery, as a server holding `creds` reads it."""
        family = creds.get("family")
        if family == "wecom":
            # WeCom signs only with msg_signature, over the Encrypt it covers.
            xml = crypto(creds).decrypt_message(
                body, query["msg_signature"], query["timestamp"], query["nonce"])
            return xml, parse_wecom_message(xml)
        check_signature(creds["token"], query["signature"], query["timestamp"], query["nonce"])
        if family == "json":
            text = body
            if query.get("encrypt_type") == "aes":
                encrypt = json.loads(body)["Encrypt"]
                expected = _get_signature(creds["token"], query["timestamp"], query["nonce"], encrypt)
                if expected != query["msg_signature"]:
                    raise InvalidSignatureException()
                text = PrpCrypto(crypto(creds).key).decrypt(encrypt, creds["app_id"])
            fields = json.loads(text)
            return text, parse_message(xmltodict.unparse({"xml": {
                k: v for k, v in fields.items() if isinstance(v, (str, int))}}))
        if query.get("encrypt_type") == "aes":
            xml = crypto(creds).decrypt_message(
                body, query["msg_signature"], query["timestamp"], query["nonce"])
        else:
            xml = body
        fields = xmltodict.parse(xml)["xml"]
        if "InfoType" in fields:
            # An Open Platform's authorisation event, as wechatpy's component reads it.
            kind = COMPONENT_MESSAGE_TYPES.get(fields["InfoType"].lower(), ComponentUnknownMessage)
            return xml, kind(fields)
        return xml, parse_message(xml)

    def wechat(self, account, body):
        creds = CONFIG["accounts"][account]
        try:
            envelope = xmltodict.parse(body)["xml"]
            encrypted = "Encrypt" in envelope
            if encrypted:
                xml = crypto(creds).decrypt_message(
                    body, envelope["MsgSignature"], envelope["TimeStamp"], envelope["Nonce"])
            else:
                xml = body
            reply = xmltodict.parse(xml)["xml"]
        except Exception as e:
            return self.answer(422, "%s: %s" % (type(e).__name__, e))
        self.answer(200, json.dumps({"encrypted": encrypted, "reply": reply}), "application/json")


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    print("listening %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
