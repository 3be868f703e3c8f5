//! Traces over real sockets: the relay exports OTLP/HTTP to a local receiver
//! (a fake target that records each export), which the tests decode with
//! OpenTelemetry's own protobuf types. A push and every attempt at its
//! deliveries, inline or by a worker, are one trace; each delivery names its
//! attempt's span in `traceparent`; nothing secret leaves in a span; and with
//! traces off no delivery carries a `traceparent`.

use crate::common;

use common::target::{Behaviour, FakeTarget, Received};
use common::{config, generated, metric, push_as_wechat, reference_now, target, TestRelay};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
const OPENID: &str = "oTraceUserOpenId0123456789ab";
const CONTENT: &str = "my card number is 6222 0000 1111";

/// Login events to the broker (which answers WeChat) and the hooks; the
/// rest to the hooks.
const ROUTES: &str = "[[routes]]\nmatch = { event = [\"subscribe\", \"SCAN\"] }\nto = [\"broker\", \"hooks\"]\nreply_from = \"broker\"\n\n[[routes]]\nto = [\"hooks\"]\n";

fn relay_config(g: &Value, broker: &FakeTarget, hooks: &FakeTarget, telemetry: &str) -> String {
    let targets = [
        target("broker", &broker.url("/broker"), "retry = \"login\""),
        target("hooks", &hooks.url("/hooks"), "retry = \"durable\""),
    ];
    format!("{}\n{telemetry}", config(g, &targets, ROUTES))
}

fn subscribe(now: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_relay]]></ToUserName><FromUserName><![CDATA[{OPENID}]]></FromUserName>\
         <CreateTime>{now}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event>\
         <EventKey><![CDATA[qrscene_login_42]]></EventKey><Ticket><![CDATA[gQTicket42]]></Ticket></xml>"
    )
}

fn text(now: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_relay]]></ToUserName><FromUserName><![CDATA[{OPENID}]]></FromUserName>\
         <CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType>\
         <Content><![CDATA[{CONTENT}]]></Content><MsgId>24842001</MsgId></xml>"
    )
}

/// Every span the receiver was sent, with the service it came from.
fn exported(collector: &FakeTarget) -> Vec<(String, Span)> {
    let mut spans = Vec::new();
    for export in collector.received() {
        assert_eq!(export.uri, "/v1/traces");
        let content_type = export.headers.get("content-type").unwrap();
        assert_eq!(content_type, "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(export.body).unwrap();
        for resource in request.resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            let service = text_of(&attributes, "service.name").unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }
    spans
}

fn value_of<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text_of(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value_of(attributes, key)? {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_of(span: &Span, key: &str) -> Option<i64> {
    match value_of(&span.attributes, key)? {
        AnyValue::IntValue(n) => Some(*n),
        _ => None,
    }
}

fn named<'s>(spans: &'s [(String, Span)], name: &str) -> Vec<&'s Span> {
    spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == name)
        .collect()
}

/// The trace and span a delivery's `traceparent` names, in hex.
fn traceparent(received: &Received) -> (String, String) {
    let value = received
        .headers
        .get("traceparent")
        .unwrap()
        .to_str()
        .unwrap();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[3]),
        (4, "00", "01"),
        "{value}"
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

/// What WeChat sent that the relay must never export: the `<Encrypt>`
/// of a raw delivery's body.
fn ciphertext(received: &Received) -> String {
    let body = received.text();
    let start = body.find("<Encrypt><![CDATA[").unwrap() + "<Encrypt><![CDATA[".len();
    let end = start + body[start..].find("]]>").unwrap();
    body[start..end].to_owned()
}

#[tokio::test]
async fn a_push_and_every_attempt_at_its_deliveries_are_one_trace() {
    let g = generated();
    let (broker, hooks, collector) = (
        FakeTarget::start().await,
        FakeTarget::start().await,
        FakeTarget::start().await,
    );
    // The inline attempt fails; a worker delivers the retry.
    broker.script([Behaviour::status(503)]);
    let telemetry = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"relay-under-test\"\n",
        collector.url("")
    );
    let toml = relay_config(&g, &broker, &hooks, &telemetry);
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let now = reference_now(&g);
    push_as_wechat(&relay, &g, "secure", &subscribe(now), OPENID).await;
    push_as_wechat(&relay, &g, "secure", &text(now), OPENID).await;
    assert!(hooks.wait_for(2, WAIT).await, "both events to the hooks");
    assert!(broker.wait_for(1, WAIT).await, "the inline attempt");
    // Every outcome so far recorded, so that moving the clock ends no lease.
    assert!(relay.until_nothing_pending("hooks").await);
    assert!(relay.until_attempts("broker", 1).await);
    // Past the retry's time on the relay's clock: a worker sends it.
    relay.clock.advance_ms(60_000);
    assert!(broker.wait_for(2, WAIT).await, "the retry");

    // A push, its three children and three attempts; a push, two children
    // (no reply target) and one attempt.
    let all_exported = || {
        let n = exported(&collector).len();
        async move { n >= 11 }
    };
    assert!(common::eventually(WAIT, all_exported).await);
    let spans = exported(&collector);
    assert_eq!(spans.len(), 11, "{spans:#?}");
    assert!(spans
        .iter()
        .all(|(service, _)| service == "relay-under-test"));
    let names: HashSet<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let expected = [
        "wechat.push",
        "verify",
        "spool.commit",
        "reply",
        "deliver.attempt",
    ];
    assert_eq!(names, expected.into_iter().collect());

    let pushes = named(&spans, "wechat.push");
    assert_eq!(pushes.len(), 2);
    for push in &pushes {
        let event_id = int_of(push, "wxrelay.event_id").unwrap();
        assert!(push.parent_span_id.is_empty(), "a push starts its trace");
        let in_trace: Vec<&Span> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.trace_id == push.trace_id && s.span_id != push.span_id)
            .collect();
        for span in &in_trace {
            assert_eq!(
                span.parent_span_id, push.span_id,
                "{} under the push",
                span.name
            );
            assert_eq!(
                int_of(span, "wxrelay.event_id"),
                Some(event_id),
                "{}",
                span.name
            );
        }
        let mut children: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
        children.sort_unstable();
        let attempts = in_trace.iter().filter(|s| s.name == "deliver.attempt");
        match text_of(&push.attributes, "wxrelay.event").as_deref() {
            Some("subscribe") => {
                assert_eq!(
                    children,
                    [
                        "deliver.attempt",
                        "deliver.attempt",
                        "deliver.attempt",
                        "reply",
                        "spool.commit",
                        "verify"
                    ]
                );
                let mut seen: Vec<(String, i64, Option<i64>)> = attempts
                    .map(|a| {
                        let target = text_of(&a.attributes, "wxrelay.target").unwrap();
                        let status = int_of(a, "http.response.status_code");
                        (target, int_of(a, "wxrelay.attempt").unwrap(), status)
                    })
                    .collect();
                seen.sort();
                let expected = [
                    ("broker".to_owned(), 1, Some(503)),
                    ("broker".to_owned(), 2, Some(200)),
                    ("hooks".to_owned(), 1, Some(200)),
                ];
                assert_eq!(seen, expected);
                let reply = in_trace.iter().find(|s| s.name == "reply").unwrap();
                assert_eq!(
                    text_of(&reply.attributes, "wxrelay.outcome").as_deref(),
                    Some("none")
                );
            }
            _ => {
                assert_eq!(children, ["deliver.attempt", "spool.commit", "verify"]);
                assert_eq!(
                    text_of(&push.attributes, "wxrelay.msg_type").as_deref(),
                    Some("text")
                );
            }
        }
        let hash = text_of(&push.attributes, "wxrelay.openid_hash");
        assert_eq!(hash, Some(wxrelay::short_hash(OPENID)));
        assert_eq!(
            text_of(&push.attributes, "wxrelay.account").as_deref(),
            Some("secure")
        );
        assert_eq!(
            text_of(&push.attributes, "wxrelay.verdict").as_deref(),
            Some("ok")
        );
    }

    // Each delivery names its own attempt's span, in the push's trace.
    let attempts = named(&spans, "deliver.attempt");
    let mut named_spans = HashSet::new();
    for received in broker.received().iter().chain(&hooks.received()) {
        let (trace_id, span_id) = traceparent(received);
        let attempt = attempts
            .iter()
            .find(|a| hex::encode(&a.span_id) == span_id)
            .unwrap_or_else(|| panic!("no attempt span {span_id}"));
        assert_eq!(hex::encode(&attempt.trace_id), trace_id);
        assert!(pushes.iter().any(|p| p.trace_id == attempt.trace_id));
        assert!(named_spans.insert(span_id), "one span per attempt");
    }
    assert_eq!(named_spans.len(), 4);

    // Nothing secret went out, in any span or resource of any export.
    let c = &g["config"];
    let secrets = [
        c["token"].as_str().unwrap().to_owned(),
        c["encoding_aes_key"].as_str().unwrap().to_owned(),
        ciphertext(&broker.received()[0]),
        ciphertext(&hooks.received()[1]),
        CONTENT.to_owned(),
        OPENID.to_owned(),
        "gQTicket42".to_owned(),
    ];
    for export in collector.received() {
        for secret in &secrets {
            let found = export
                .body
                .windows(secret.len())
                .any(|w| w == secret.as_bytes());
            assert!(!found, "an export carries {secret:?}");
        }
    }
    relay.stop().await;
}

#[tokio::test]
async fn with_traces_off_no_delivery_carries_a_traceparent() {
    let g = generated();
    let (broker, hooks) = (FakeTarget::start().await, FakeTarget::start().await);
    let toml = relay_config(&g, &broker, &hooks, "");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let now = reference_now(&g);
    push_as_wechat(&relay, &g, "secure", &subscribe(now), OPENID).await;
    push_as_wechat(&relay, &g, "secure", &text(now), OPENID).await;
    assert!(broker.wait_for(1, WAIT).await);
    assert!(hooks.wait_for(2, WAIT).await);
    for received in broker.received().iter().chain(&hooks.received()) {
        assert!(
            received.headers.get("traceparent").is_none(),
            "{:?}",
            received.headers
        );
        assert!(
            received.headers.get("tracestate").is_none(),
            "{:?}",
            received.headers
        );
    }
    relay.stop().await;
}

/// A collector that is not there costs the pushes nothing: each is answered,
/// delivered with its `traceparent`, and the spans that could not be sent
/// are counted.
#[tokio::test]
async fn spans_a_collector_cannot_take_are_dropped_and_counted() {
    let g = generated();
    let (broker, hooks) = (FakeTarget::start().await, FakeTarget::start().await);
    let nobody = common::free_port();
    let telemetry = format!("[telemetry]\notlp_endpoint = \"http://{nobody}\"\n");
    let toml = relay_config(&g, &broker, &hooks, &telemetry);
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let now = reference_now(&g);
    for n in 0..10 {
        let xml = text(now).replace("24842001", &format!("2484200{n}"));
        push_as_wechat(&relay, &g, "secure", &xml, OPENID).await;
    }
    assert!(hooks.wait_for(10, WAIT).await);
    assert!(hooks
        .received()
        .iter()
        .all(|r| r.headers.contains_key("traceparent")));
    let dropped = || {
        let relay = &relay;
        async move {
            let text = relay.metrics().await;
            metric(
                &text,
                "wxrelay_trace_spans_dropped_total",
                &[("reason", "export_failed")],
            ) >= 1.0
        }
    };
    assert!(
        common::eventually(WAIT, dropped).await,
        "failed exports are counted"
    );
    relay.stop().await;
}

/// The push's trace context travels with its event: a relay started later
/// on the same spool (another replica, on PostgreSQL) sends the delivery as
/// a span of the push's trace, which the first relay exported as it stopped.
#[tokio::test]
async fn a_worker_started_later_joins_the_push_trace_through_the_spool() {
    let g = generated();
    let now = reference_now(&g);
    for engine in ["sqlite", "postgres"] {
        let (broker, hooks, collector) = (
            FakeTarget::start().await,
            FakeTarget::start().await,
            FakeTarget::start().await,
        );
        let telemetry = format!("[telemetry]\notlp_endpoint = \"{}\"\n", collector.url(""));
        let toml = relay_config(&g, &broker, &hooks, &telemetry);
        let paused = toml.replacen("retry = \"login\"", "retry = \"login\"\npaused = true", 1);
        let mut relay = match engine {
            "sqlite" => TestRelay::start(&paused, now).await,
            _ => match TestRelay::start_postgres(&paused, now).await {
                Some(relay) => relay,
                None => return,
            },
        };
        push_as_wechat(&relay, &g, "secure", &subscribe(now), OPENID).await;
        relay.restart(&toml).await;
        // Past the time the reply target's delivery waits for an inline attempt.
        relay.clock.advance_ms(60_000);
        assert!(
            broker.wait_for(1, WAIT).await,
            "{engine}: delivered by the new relay"
        );
        let both = || {
            let spans = exported(&collector);
            let done = !named(&spans, "wechat.push").is_empty()
                && named(&spans, "deliver.attempt").len() == 2;
            async move { done }
        };
        assert!(common::eventually(WAIT, both).await, "{engine}");
        let spans = exported(&collector);
        let push = named(&spans, "wechat.push")[0];
        let broker_attempt = named(&spans, "deliver.attempt")
            .into_iter()
            .find(|a| text_of(&a.attributes, "wxrelay.target").as_deref() == Some("broker"))
            .unwrap();
        assert_eq!(broker_attempt.trace_id, push.trace_id, "{engine}");
        assert_eq!(broker_attempt.parent_span_id, push.span_id, "{engine}");
        let (trace_id, span_id) = traceparent(&broker.received()[0]);
        assert_eq!(
            (trace_id, span_id),
            (
                hex::encode(&push.trace_id),
                hex::encode(&broker_attempt.span_id)
            ),
            "{engine}"
        );
        relay.stop().await;
    }
}
