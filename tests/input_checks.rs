//! Edge cases of client input that must neither crash, wrap around nor be
//! misread: fractional token expiry, resume positions at the end of the
//! seq range, over-long record ids, and requests that are not protobuf.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use strom::auth::AuthSettings;
use strom::bus::nats::NatsConfig;
use strom::proto;
use strom::server::ServerConfig;
use tonic::Code;

async fn with_tokens() -> TestServer {
    TestServer::start(ServerConfig {
        auth: AuthSettings {
            jwt_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    })
    .await
}

/// A token for `alice` whose `exp` is an hour away with a fraction
/// (RFC 7519 allows non-integer NumericDates).
fn fractional_token() -> (String, u64) {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({"exp": exp as f64 + 0.5, "strom": {"publish": ["posts"]}});
    (token("alice", claims), exp)
}

#[tokio::test]
async fn a_fractional_exp_is_read_as_that_moment_on_websocket_and_sse() {
    let server = with_tokens().await;
    let (token, exp) = fractional_token();

    let mut ws = WsClient::connect(server.addr, &format!("?token={token}"))
        .await
        .unwrap();
    let reply = ws.request(json!({"action": "auth", "token": token})).await;
    assert_eq!(reply["type"], "authenticated", "{reply}");
    let expires_at = reply["data"]["expires_at"].as_str().unwrap();
    let expected = strom::event::format_timestamp(UNIX_EPOCH + Duration::from_secs(exp));
    assert_eq!(
        expires_at[..19],
        expected[..19],
        "expires_at is the token's exp"
    );
    ws.subscribe("posts").await;

    let mut sse = SseReader::open(
        server.addr,
        &format!("/api/v1/realtime/posts?token={token}"),
        "",
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.next().await.unwrap().event, "connected");

    let event = json!({"type": "record.created", "collection": "posts",
        "record_id": "1", "data": {}});
    let (status, body) = server
        .post(
            &format!("/api/v1/publish?token={token}"),
            &event.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let event = ws.reply().await;
    assert_eq!(event["type"], "event", "still open: {event}");
    assert_eq!(sse.next_of("record.created").await.id, Some("1".into()));
}

#[tokio::test]
async fn a_resume_position_past_the_head_replays_nothing_with_nats() {
    let nats = NatsServer::start();
    let server = TestServer::start(ServerConfig {
        nats: Some(NatsConfig::new(nats.url.clone())),
        ..ServerConfig::default()
    })
    .await;
    for n in 0..3 {
        server
            .publish_json(json!({"type": "record.created", "collection": "posts",
                "record_id": format!("old-{n}"), "data": {}}))
            .await;
    }
    let mut client = server.grpc().await;
    let request = proto::SubscribeRequest {
        since_seq: Some(u64::MAX),
        ..text_subscription("posts", None)
    };
    let mut grpc = grpc_subscribe(&mut client, request).await;
    let mut ws = WsClient::connect(server.addr, "").await.unwrap();
    ws.subscribe_with(json!({"action": "subscribe", "collection": "posts",
        "since": u64::MAX}))
        .await;

    let seq = server
        .publish_json(json!({"type": "record.created", "collection": "posts",
            "record_id": "new", "data": {}}))
        .await;
    let event = next_event(&mut grpc).await;
    assert_eq!((event.record_id.as_str(), event.seq), ("new", seq));
    let event = ws.reply().await;
    assert_eq!(event["type"], "event", "{event}");
    assert_eq!(event["data"]["record_id"], "new");
}

#[tokio::test]
async fn subscribing_by_an_over_long_record_id_is_refused() {
    let server = TestServer::memory().await;
    let long = "r".repeat(strom::event::MAX_RECORD_ID + 1);

    let mut ws = WsClient::connect(server.addr, "").await.unwrap();
    ws.send(json!({"action": "subscribe", "collection": "posts", "record_id": long}))
        .await;
    ws.expect_error("record_id is longer than 256 bytes").await;
    ws.subscribe_with(json!({"action": "subscribe", "collection": "posts",
        "record_id": "r".repeat(strom::event::MAX_RECORD_ID)}))
        .await;

    let mut client = server.grpc().await;
    let refused = client
        .subscribe(proto::SubscribeRequest {
            record_id: long,
            ..text_subscription("posts", None)
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("record_id"), "{refused}");
}

/// Bytes sent as a request body as they are.
#[derive(Clone, PartialEq, Default, Debug)]
struct Raw(Vec<u8>);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

#[tokio::test]
async fn a_request_that_is_not_protobuf_is_an_invalid_argument() {
    let server = TestServer::memory().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    // Field 1 (events), length-delimited, claiming 100 bytes that are not there.
    let garbage = Raw(vec![0x0a, 100, 1, 2, 3]);
    for method in ["Publish", "GetPresence"] {
        grpc.ready().await.unwrap();
        let path = format!("/strom.v1.Realtime/{method}").parse().unwrap();
        let status = grpc
            .unary::<_, proto::PublishResponse, _>(
                tonic::Request::new(garbage.clone()),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status}");
        assert!(status.message().contains("malformed request"), "{status}");
    }
    // The server is still there.
    server
        .publish_json(json!({"type": "record.created", "collection": "posts", "data": {}}))
        .await;
}

#[tokio::test]
async fn open_mode_treats_a_credential_it_cannot_verify_the_same_everywhere() {
    let server = TestServer::memory().await;
    let bearer = "Authorization: Bearer not-a-jwt-nor-a-key\r\n";
    let (status, _, body) = http_with(server.addr, "GET", "/api/v1/presence", bearer, "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let event = json!({"type": "record.created", "collection": "posts", "data": {}});
    let (status, _, body) = http_with(
        server.addr,
        "POST",
        "/api/v1/publish",
        bearer,
        &event.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut client = server.grpc().await;
    let mut request = tonic::Request::new(proto::GetPresenceRequest::default());
    request.metadata_mut().insert(
        "authorization",
        "Bearer not-a-jwt-nor-a-key".parse().unwrap(),
    );
    client
        .get_presence(request)
        .await
        .expect("answered as for an anonymous caller");
}
