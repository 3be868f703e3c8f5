"""An independent WeChat implementation (wechatpy) on both sides of the relay.

As the broker, it serves each `format = "wechat"` target: it checks the
signature, decrypts with the target's credentials as any WeChat server built
on wechatpy would, parses the message, records what it got, and answers
`success`, an encrypted reply or a plaintext reply. As "WeChat", it opens the
relay's answers with the account's credentials.

    python wechatpy_peer.py CONFIG_JSON

CONFIG_JSON: {"targets": {NAME: {"token", "encoding_aes_key", "app_id"}},
              "accounts": {NAME: {"token", "encoding_aes_key", "app_id"}}}

Prints "listening PORT" once ready, then serves until killed:

    GET  /broker/TARGET[/…]?signature&timestamp&nonce&echostr  the URL check
    POST /broker/TARGET/REPLY?...   a delivery; REPLY: none | encrypted | plaintext
    POST /wechat/ACCOUNT?timestamp&nonce   open the relay's answer as WeChat
    GET  /results                          every delivery's record, as JSON
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import xmltodict
from wechatpy import parse_message
from wechatpy.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidSignatureException
from wechatpy.replies import create_reply
from wechatpy.utils import check_signature

CONFIG = json.loads(sys.argv[1])
RESULTS = []
LOCK = threading.Lock()


def crypto(creds):
    return WeChatCrypto(creds["token"], creds["encoding_aes_key"], creds["app_id"])


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
        if len(path) == 3 and path[0] == "broker":
            return self.broker(path[1], path[2], query, body)
        if len(path) == 2 and path[0] == "wechat":
            return self.wechat(path[1], body)
        self.answer(404, "not found")

    def broker(self, target, reply, query, body):
        creds = CONFIG["targets"][target]
        entry = {"target": target, "query": query}
        try:
            check_signature(creds["token"], query["signature"], query["timestamp"], query["nonce"])
            if query.get("encrypt_type") == "aes":
                xml = crypto(creds).decrypt_message(
                    body, query["msg_signature"], query["timestamp"], query["nonce"])
            else:
                xml = body
            message = parse_message(xml)
        except Exception as e:  # every failure is a finding, recorded as such
            entry.update(ok=False, error="%s: %s" % (type(e).__name__, e))
            record(entry)
            return self.answer(403, "refused")
        entry.update(ok=True, xml=xml, type=message.type,
                     event=getattr(message, "event", None))
        record(entry)
        if reply == "none":
            return self.answer(200, "success")
        text = "echo %s from %s" % (message.type, target)
        rendered = create_reply(text, message, render=True)
        if reply == "encrypted":
            rendered = crypto(creds).encrypt_message(rendered, query["nonce"], query["timestamp"])
        self.answer(200, rendered, "application/xml")

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
