//! Authentication and authorization on every transport: tokens good and
//! bad, per-collection rights, grants, API keys, row-level rules, expiry
//! mid-stream and refresh.

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use strom::auth::AuthSettings;
use strom::auth::token::mint;
use strom::proto;
use strom::server::ServerConfig;
use tonic::Code;

const API_KEY: &str = "backend-key-0123456789";

const POLICY: &str = r#"
[[api_keys]]
name = "backend"
key = "backend-key-0123456789"
publish = ["*"]
subscribe = ["*"]

[[collections]]
match = "public"
subscribe = "anyone"
publish = "authenticated"

[[collections]]
match = "orders"
subscribe = "authenticated"
publish = "claim:role=admin"
row_filter = "owner_id = $sub"

[[collections]]
match = "admin.*"
subscribe = "claim:role=admin"
"#;

async fn secured() -> Secured {
    Secured::start(POLICY, ServerConfig::default()).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token_with(sub: &str, claims: Value, ttl: Duration) -> String {
    let claims: Map<String, Value> = claims.as_object().unwrap().clone();
    mint(Algorithm::HS256, SECRET.as_bytes(), sub, claims, ttl).unwrap()
}

/// Every kind of bad token, with the reason the server must give.
fn bad_tokens() -> Vec<(&'static str, String, &'static str)> {
    use base64::Engine as _;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = |extra: Value| {
        let mut c = json!({"sub": "mallory", "exp": now() + 3600});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c.as_object().unwrap().clone()
    };
    vec![
        (
            "expired",
            mint(
                Algorithm::HS256,
                SECRET.as_bytes(),
                "mallory",
                claims(json!({"exp": now() - 600})),
                Duration::ZERO,
            )
            .unwrap(),
            "expired",
        ),
        (
            "not yet valid",
            mint(
                Algorithm::HS256,
                SECRET.as_bytes(),
                "mallory",
                claims(json!({"nbf": now() + 3600})),
                Duration::ZERO,
            )
            .unwrap(),
            "not valid yet",
        ),
        (
            "wrong signature",
            mint(
                Algorithm::HS256,
                b"another-secret-of-sufficient-length-000",
                "mallory",
                claims(json!({})),
                Duration::ZERO,
            )
            .unwrap(),
            "bad signature",
        ),
        (
            "wrong algorithm",
            mint(
                Algorithm::HS512,
                SECRET.as_bytes(),
                "mallory",
                claims(json!({})),
                Duration::ZERO,
            )
            .unwrap(),
            "algorithm",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "typ": "JWT"})),
                b64(Value::Object(claims(json!({}))))
            ),
            "invalid token",
        ),
    ]
}

async fn subscribe_as(
    server: &TestServer,
    credential: Option<&str>,
    request: proto::SubscribeRequest,
) -> Result<tonic::Streaming<proto::SubscribeResponse>, tonic::Status> {
    let mut client = server.grpc().await;
    let mut stream = client
        .subscribe(authorized(request, credential))
        .await?
        .into_inner();
    let first = within("subscribed", stream.message())
        .await?
        .expect("a message");
    assert!(matches!(
        first.kind,
        Some(proto::subscribe_response::Kind::Subscribed(_))
    ));
    Ok(stream)
}

async fn publish_as(
    server: &TestServer,
    credential: Option<&str>,
    events: Vec<proto::Event>,
) -> Result<Vec<u64>, tonic::Status> {
    let mut client = server.grpc().await;
    Ok(client
        .publish(authorized(proto::PublishRequest { events }, credential))
        .await?
        .into_inner()
        .seqs)
}

#[tokio::test]
async fn grpc_subscribe_rights() {
    let s = secured().await;
    let alice = token("alice", json!({}));
    let admin = token("root", json!({"role": "admin"}));
    let status = subscribe_as(&s.server, None, text_subscription("posts", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("needs a token"),
        "{}",
        status.message()
    );
    subscribe_as(&s.server, None, text_subscription("public", None))
        .await
        .expect("anyone may read public");
    subscribe_as(&s.server, Some(&alice), text_subscription("posts", None))
        .await
        .expect("authenticated users may read by default");
    let status = subscribe_as(
        &s.server,
        Some(&alice),
        text_subscription("admin.audit", None),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    subscribe_as(
        &s.server,
        Some(&admin),
        text_subscription("admin.audit", None),
    )
    .await
    .expect("the admin claim opens admin.*");
    for (what, bad, reason) in bad_tokens() {
        let status = subscribe_as(&s.server, Some(&bad), text_subscription("public", None))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert!(
            status.message().contains(reason),
            "{what}: {}",
            status.message()
        );
    }
}

#[tokio::test]
async fn grpc_publish_rights_grants_and_api_keys() {
    let s = secured().await;
    let alice = token("alice", json!({}));
    let writer = token("writer", json!({"strom": {"publish": ["posts", "news.*"]}}));
    let admin = token("root", json!({"role": "admin"}));
    let post = || vec![created("posts", "p", json!({}))];
    assert_eq!(
        publish_as(&s.server, None, post())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        publish_as(&s.server, Some(&alice), post())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied,
        "publishing needs a grant by default"
    );
    publish_as(&s.server, Some(&writer), post()).await.unwrap();
    publish_as(
        &s.server,
        Some(&writer),
        vec![created("news.today", "n", json!({}))],
    )
    .await
    .unwrap();
    publish_as(
        &s.server,
        Some(&alice),
        vec![created("public", "x", json!({}))],
    )
    .await
    .expect("public takes any authenticated publisher");
    assert_eq!(
        publish_as(
            &s.server,
            Some(&writer),
            vec![created("orders", "o", json!({}))]
        )
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );
    publish_as(
        &s.server,
        Some(&admin),
        vec![created("orders", "o", json!({}))],
    )
    .await
    .unwrap();
    publish_as(
        &s.server,
        Some(API_KEY),
        vec![created("orders", "o", json!({}))],
    )
    .await
    .expect("the API key publishes anywhere");
    let mut client = s.server.grpc().await;
    let mut request = tonic::Request::new(proto::PublishRequest { events: post() });
    request
        .metadata_mut()
        .insert("x-api-key", API_KEY.parse().unwrap());
    client.publish(request).await.expect("x-api-key works too");
    let status = publish_as(&s.server, Some("not-a-known-key-at-all"), post())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // A batch with one forbidden event publishes nothing.
    let before = publish_as(&s.server, Some(&writer), post()).await.unwrap()[0];
    let mixed = vec![
        created("posts", "a", json!({})),
        created("orders", "b", json!({})),
    ];
    assert!(publish_as(&s.server, Some(&writer), mixed).await.is_err());
    let after = publish_as(&s.server, Some(&writer), post()).await.unwrap()[0];
    assert_eq!(after, before + 1);
}

#[tokio::test]
async fn row_rules_cannot_be_widened_by_the_client_filter() {
    let s = secured().await;
    let alice = token("alice", json!({}));
    let order = |id: &str, owner: &str, total: u64| {
        created("orders", id, json!({"owner_id": owner, "total": total}))
    };
    // Alice asks for Bob's orders, and for everything with `||`.
    let mut sneaky = subscribe_as(
        &s.server,
        Some(&alice),
        text_subscription("orders", Some(r#"owner_id = "bob" || total > 0"#)),
    )
    .await
    .unwrap();
    let mut everything = subscribe_as(&s.server, Some(&alice), text_subscription("*", None))
        .await
        .unwrap();
    publish_as(
        &s.server,
        Some(API_KEY),
        vec![
            order("1", "bob", 5),
            order("2", "alice", 7),
            order("3", "bob", 9),
        ],
    )
    .await
    .unwrap();
    publish_as(
        &s.server,
        Some(API_KEY),
        vec![created("admin.audit", "x", json!({}))],
    )
    .await
    .unwrap();
    let marker = publish_as(
        &s.server,
        Some(API_KEY),
        vec![created("posts", "end", json!({}))],
    )
    .await
    .unwrap()[0];
    assert_eq!(next_event(&mut sneaky).await.record_id, "2");
    let seen: Vec<String> = [
        next_event(&mut everything).await,
        next_event(&mut everything).await,
    ]
    .into_iter()
    .map(|e| format!("{}/{}", e.collection, e.record_id))
    .collect();
    assert_eq!(seen, ["orders/2", "posts/end"], "no Bob orders, no admin.*");
    // A resume replays through the same rule.
    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("orders", None)
    };
    let mut replay = subscribe_as(&s.server, Some(&alice), request)
        .await
        .unwrap();
    assert_eq!(next_event(&mut replay).await.record_id, "2");
    let _ = marker;
}

#[tokio::test]
async fn an_expiring_token_ends_the_grpc_stream() {
    let s = secured().await;
    let short = token_with("alice", json!({}), Duration::from_secs(1));
    let mut stream = subscribe_as(&s.server, Some(&short), text_subscription("posts", None))
        .await
        .unwrap();
    let status = loop {
        match within("the expiry", stream.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{}", status.message());
}

async fn ws_connect(server: &TestServer, query: &str) -> Result<WsClient, u16> {
    WsClient::connect(server.addr, query).await
}

#[tokio::test]
async fn websocket_tokens_auth_action_and_stats() {
    let s = secured().await;
    let alice = token("alice", json!({"email": "alice@example.com"}));
    let bob = token("bob", json!({}));
    for (what, bad, _) in bad_tokens() {
        let refused = ws_connect(&s.server, &format!("?token={bad}")).await.err();
        assert_eq!(refused, Some(401), "{what} is refused before the upgrade");
    }
    let mut anonymous = ws_connect(&s.server, "").await.unwrap();
    let denied = anonymous
        .request(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    assert_eq!(denied["type"], "error");
    assert_eq!(denied["data"]["code"], "unauthenticated");
    for (what, bad, reason) in bad_tokens() {
        let reply = anonymous
            .request(json!({"action": "auth", "token": bad}))
            .await;
        assert_eq!(reply["type"], "error", "{what}");
        assert!(
            reply["data"]["message"].as_str().unwrap().contains(reason),
            "{what}: {reply}"
        );
    }
    let reply = anonymous
        .request(json!({"action": "auth", "token": alice}))
        .await;
    assert_eq!(reply["type"], "authenticated");
    assert_eq!(reply["data"]["user_id"], "alice");
    assert_eq!(reply["data"]["email"], "alice@example.com");
    let reply = anonymous
        .request(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    let reply = anonymous
        .request(json!({"action": "subscribe", "collection": "admin.audit"}))
        .await;
    assert_eq!(reply["data"]["code"], "permission_denied");
    let reply = anonymous
        .request(json!({"action": "auth", "token": bob}))
        .await;
    assert!(
        reply["data"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot change user")
    );

    let _second_alice = ws_connect(&s.server, &format!("?token={alice}"))
        .await
        .unwrap();
    let _bob = ws_connect(&s.server, &format!("?token={bob}"))
        .await
        .unwrap();
    let api_key = format!("X-Api-Key: {API_KEY}\r\n");
    let (_, _, stats) = http_with(s.server.addr, "GET", "/api/v1/stats", &api_key, "")
        .await
        .unwrap();
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["total_connections"], 3);
    assert_eq!(stats["authenticated_connections"], 3);
    assert_eq!(stats["unique_users"], 2);
    assert_eq!(stats["auth"], "enforced");
}

#[tokio::test]
async fn websocket_expiry_closes_and_refresh_keeps_it_open() {
    let s = secured().await;
    let short = token_with("alice", json!({}), Duration::from_secs(1));
    let mut expiring = ws_connect(&s.server, &format!("?token={short}"))
        .await
        .unwrap();
    let error = expiring.next().await.unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    assert_eq!(expiring.next().await.unwrap()["code"], 4001);

    let short = token_with("alice", json!({}), Duration::from_secs(2));
    let short_exp = now() + 2;
    let mut refreshed = ws_connect(&s.server, &format!("?token={short}"))
        .await
        .unwrap();
    let reply = refreshed
        .request(json!({"action": "auth", "token": token("alice", json!({}))}))
        .await;
    assert_eq!(reply["type"], "authenticated");
    refreshed
        .request(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    // Past the first token's expiry (what is tested here is time passing),
    // the connection still delivers.
    let past_expiry = UNIX_EPOCH + Duration::from_secs(short_exp + 1);
    if let Ok(wait) = past_expiry.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    publish_as(
        &s.server,
        Some(API_KEY),
        vec![created("posts", "later", json!({}))],
    )
    .await
    .unwrap();
    let event = refreshed.next().await.expect("still open");
    assert_eq!(event["type"], "event", "{event}");
    assert_eq!(event["data"]["record_id"], "later");
}

#[tokio::test]
async fn sse_and_rest_enforce_the_same_rules() {
    let s = secured().await;
    let alice = token("alice", json!({}));
    let writer = token("writer", json!({"strom": {"publish": ["posts"]}}));
    let (status, body) = s.server.get("/api/v1/realtime/posts").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthenticated"));
    let (status, _) = s
        .server
        .get(&format!("/api/v1/realtime/admin.x?token={alice}"))
        .await;
    assert_eq!(status, 403);
    for (what, bad, _) in bad_tokens() {
        let (status, _) = s
            .server
            .get(&format!("/api/v1/realtime/public?token={bad}"))
            .await;
        assert_eq!(status, 401, "{what}");
    }
    let mut sse = SseReader::open(
        s.server.addr,
        "/api/v1/realtime/orders",
        &format!("Authorization: Bearer {alice}\r\n"),
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.next().await.unwrap().event, "connected");

    let body = |collection: &str, owner: &str| {
        json!({"type": "record.created", "collection": collection, "record_id": owner,
            "data": {"owner_id": owner}})
        .to_string()
    };
    let (status, _) = s.server.post("/api/v1/publish", &body("posts", "x")).await;
    assert_eq!(status, 401);
    let publish_with = |header: String, payload: String| {
        let addr = s.server.addr;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\n{header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                payload.len()
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            tcp.read_to_string(&mut response).await.unwrap();
            response.split(' ').nth(1).unwrap().parse::<u16>().unwrap()
        }
    };
    assert_eq!(
        publish_with(format!("Authorization: Bearer {alice}"), body("posts", "x")).await,
        403
    );
    assert_eq!(
        publish_with(
            format!("Authorization: Bearer {writer}"),
            body("posts", "x")
        )
        .await,
        200
    );
    assert_eq!(
        publish_with(format!("X-Api-Key: {API_KEY}"), body("orders", "bob")).await,
        200
    );
    assert_eq!(
        publish_with(
            format!("Authorization: Bearer {API_KEY}"),
            body("orders", "alice")
        )
        .await,
        200
    );
    let (status, _) = s
        .server
        .post(
            &format!("/api/v1/publish?token={writer}"),
            &body("posts", "y"),
        )
        .await;
    assert_eq!(status, 200);
    let event = sse.next_of("record.created").await;
    assert!(
        event.data.contains(r#""owner_id":"alice""#),
        "only Alice's order: {}",
        event.data
    );
}

#[tokio::test]
async fn sse_stream_ends_when_the_token_expires() {
    let s = secured().await;
    let short = token_with("alice", json!({}), Duration::from_secs(1));
    let mut sse = SseReader::open(
        s.server.addr,
        &format!("/api/v1/realtime/posts?token={short}"),
        "",
    )
    .await;
    assert_eq!(sse.next().await.unwrap().event, "connected");
    let error = sse.next_of("stream_error").await;
    assert!(error.data.contains("expired"), "{}", error.data);
    let deprecated = sse.next().await.unwrap();
    assert_eq!(
        (deprecated.event.as_str(), deprecated.data),
        ("error", error.data),
        "then the same under the deprecated name"
    );
    assert!(sse.next().await.is_none(), "then the stream closes");
}

/// The test key pair (Ed25519) in tests/fixtures.
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// An EdDSA token signed with the fixture's private key.
fn eddsa_token(sub: &str) -> String {
    let private = std::fs::read(fixture("ed25519.pem")).unwrap();
    mint(
        Algorithm::EdDSA,
        &private,
        sub,
        Map::new(),
        Duration::from_secs(600),
    )
    .unwrap()
}

#[tokio::test]
async fn public_key_tokens_and_the_hs256_with_public_key_attack() {
    let server = TestServer::start(ServerConfig {
        auth: AuthSettings {
            jwt_public_key: Some(fixture("ed25519.pub.pem")),
            jwt_algorithm: Some("EdDSA".into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    })
    .await;
    subscribe_as(
        &server,
        Some(&eddsa_token("erin")),
        text_subscription("posts", None),
    )
    .await
    .expect("an EdDSA token verifies with the public key");
    let public = std::fs::read(fixture("ed25519.pub.pem")).unwrap();
    let forged = mint(
        Algorithm::HS256,
        &public,
        "erin",
        Map::new(),
        Duration::from_secs(600),
    )
    .unwrap();
    let status = subscribe_as(&server, Some(&forged), text_subscription("posts", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_token_command_mints_tokens_the_server_accepts() {
    let s = secured().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_strom"))
        .args([
            "token",
            "--sub",
            "cli-user",
            "--ttl",
            "10m",
            "--claims",
            r#"{"role":"admin"}"#,
        ])
        .env("STROM_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let minted = String::from_utf8(output.stdout).unwrap();
    subscribe_as(
        &s.server,
        Some(minted.trim()),
        text_subscription("admin.audit", None),
    )
    .await
    .expect("the minted admin token opens admin.*");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_strom"))
        .args(["token", "--sub", "x"])
        .env_remove("STROM_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no JWT key configured"));
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = TestServer::start(ServerConfig {
        auth: AuthSettings {
            jwt_secret: Some(SECRET.into()),
            jwt_issuer: Some("https://auth.test".into()),
            jwt_audience: Some("strom".into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let with = |claims: Value| token_with("ivy", claims, Duration::from_secs(600));
    let good = with(json!({"iss": "https://auth.test", "aud": "strom"}));
    subscribe_as(&server, Some(&good), text_subscription("posts", None))
        .await
        .expect("the right issuer and audience");
    for (claims, reason) in [
        (
            json!({"iss": "https://evil.test", "aud": "strom"}),
            "wrong issuer",
        ),
        (
            json!({"iss": "https://auth.test", "aud": "other"}),
            "wrong audience",
        ),
        (json!({"aud": "strom"}), "`iss`"),
        (json!({"iss": "https://auth.test"}), "`aud`"),
    ] {
        let status = subscribe_as(
            &server,
            Some(&with(claims.clone())),
            text_subscription("posts", None),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{claims}");
        assert!(
            status.message().contains(reason),
            "{claims}: {}",
            status.message()
        );
    }
}

#[tokio::test]
async fn a_jwks_file_supplies_the_public_key() {
    use base64::Engine as _;
    let pem = std::fs::read_to_string(fixture("ed25519.pub.pem")).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let raw = &der[der.len() - 32..];
    let jwks = json!({"keys": [{
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": "k1",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
    }]});
    let dir = TempDir::new("jwks");
    let path = dir.0.join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let server = TestServer::start(ServerConfig {
        auth: AuthSettings {
            jwks: Some(path),
            jwt_algorithm: Some("EdDSA".into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    })
    .await;
    subscribe_as(
        &server,
        Some(&eddsa_token("jo")),
        text_subscription("posts", None),
    )
    .await
    .expect("verified with the JWKS key");
    let forged = token("jo", json!({}));
    let status = subscribe_as(&server, Some(&forged), text_subscription("posts", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// An order moves from Alice to Bob. Each sees only the image its row rule
/// allows: Alice's delivery leaves her rows without Bob's new data, Bob's
/// enters his without Alice's old data; live on every transport, in a `*`
/// subscription and in a replay.
#[tokio::test]
async fn row_images_never_cross_the_row_boundary() {
    let s = secured().await;
    let (alice, bob) = (token("alice", json!({})), token("bob", json!({})));
    let mut alice_ws = ws_connect(&s.server, &format!("?token={alice}"))
        .await
        .unwrap();
    alice_ws.subscribe("orders").await;
    let mut bob_ws = ws_connect(&s.server, &format!("?token={bob}"))
        .await
        .unwrap();
    bob_ws.subscribe("orders").await;
    let mut alice_sse = SseReader::open(
        s.server.addr,
        &format!("/api/v1/realtime/orders?token={alice}"),
        "",
    )
    .await;
    assert_eq!(alice_sse.next().await.unwrap().event, "connected");
    let mut alice_grpc = subscribe_as(&s.server, Some(&alice), text_subscription("*", None))
        .await
        .unwrap();
    let mut bob_grpc = subscribe_as(&s.server, Some(&bob), text_subscription("orders", None))
        .await
        .unwrap();

    let moved = proto::Event {
        r#type: proto::EventType::RecordUpdated as i32,
        old_data: Some(strom::edge::grpc::struct_from_json(
            &json!({"owner_id": "alice", "note": "alice-only"}),
        )),
        ..created(
            "orders",
            "o1",
            json!({"owner_id": "bob", "note": "bob-only"}),
        )
    };
    publish_as(&s.server, Some(API_KEY), vec![moved])
        .await
        .unwrap();

    // Alice: left her rows; her old image, not Bob's new one.
    let event = alice_ws.reply().await;
    assert_eq!(event["data"]["left_filter"], true, "{event}");
    assert_eq!(event["data"]["data"], json!({}), "{event}");
    assert_eq!(event["data"]["old_data"]["note"], "alice-only", "{event}");
    let event = alice_sse.next_of("record.updated").await;
    assert!(!event.data.contains("bob-only"), "{}", event.data);
    assert!(event.data.contains("alice-only"), "{}", event.data);
    let event = next_event(&mut alice_grpc).await;
    assert!(event.left_filter);
    assert_eq!(
        strom::edge::grpc::json_from_struct(&event.data.unwrap()),
        json!({})
    );
    // Bob: entered his rows; his new image, not Alice's old one.
    let event = bob_ws.reply().await;
    assert_eq!(event["data"]["left_filter"], Value::Null, "{event}");
    assert_eq!(event["data"]["data"]["note"], "bob-only", "{event}");
    assert_eq!(event["data"]["old_data"], Value::Null, "{event}");
    let event = next_event(&mut bob_grpc).await;
    assert!(!event.left_filter && event.old_data.is_none(), "{event:?}");
    // A replay shows the same.
    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("orders", None)
    };
    let mut replay = subscribe_as(&s.server, Some(&alice), request)
        .await
        .unwrap();
    let event = next_event(&mut replay).await;
    assert!(event.left_filter);
    assert!(!format!("{event:?}").contains("bob-only"), "{event:?}");
}

/// A server with the test policy plus `extra` at the top of the file.
async fn secured_with(extra: &str) -> Secured {
    Secured::start(&format!("{extra}\n{POLICY}"), ServerConfig::default()).await
}

/// (type, user, channel) of a presence event's JSON (`data` of a
/// WebSocket event or SSE message).
fn presence_of(event: &Value) -> Option<(String, String, Value)> {
    (event["collection"] == "presence").then(|| {
        (
            event["type"].as_str().unwrap().to_owned(),
            event["data"]["user_id"].as_str().unwrap().to_owned(),
            event["data"]["channel"].clone(),
        )
    })
}

fn seen(kind: &str, channel: Value) -> (String, String, Value) {
    (kind.to_owned(), "root".to_owned(), channel)
}

/// Presence events about `root` a WebSocket watcher receives, up to and
/// including `last`.
async fn ws_presence_until(
    watcher: &mut WsClient,
    last: &(String, String, Value),
) -> Vec<(String, String, Value)> {
    let mut got = Vec::new();
    while got.last() != Some(last) {
        let message = watcher.reply().await;
        assert_ne!(message["type"], "error", "{message}");
        if let Some(event) = presence_of(&message["data"]).filter(|e| e.1 == "root") {
            got.push(event);
        }
    }
    got
}

async fn sse_presence_until(
    sse: &mut SseReader,
    last: &(String, String, Value),
) -> Vec<(String, String, Value)> {
    let mut got = Vec::new();
    while got.last() != Some(last) {
        let event = sse.next().await.expect("the stream goes on");
        assert_ne!(event.event, "error", "{}", event.data);
        if event.event.starts_with("user.") {
            let data: Value = serde_json::from_str(&event.data).unwrap();
            if let Some(event) = presence_of(&data).filter(|e| e.1 == "root") {
                got.push(event);
            }
        }
    }
    got
}

async fn grpc_presence_until(
    stream: &mut tonic::Streaming<proto::SubscribeResponse>,
    last: &(String, String, Value),
) -> Vec<(String, String, Value)> {
    let mut got = Vec::new();
    while got.last() != Some(last) {
        let event = next_event(stream).await;
        if event.collection != "presence" {
            continue;
        }
        let data = strom::edge::grpc::json_from_struct(event.data.as_ref().unwrap());
        let kind = match proto::EventType::try_from(event.r#type).unwrap() {
            proto::EventType::UserJoined => "user.joined",
            proto::EventType::UserLeft => "user.left",
            other => panic!("{other:?} on presence"),
        };
        if data["user_id"] == "root" {
            got.push((kind.into(), "root".into(), data["channel"].clone()));
        }
    }
    got
}

/// Who is in a channel, and its joins and leaves, go only to those who may
/// subscribe to that channel: REST, GetPresence, WatchPresence, and the
/// `presence` collection over WebSocket, SSE and gRPC (directly and
/// through `*`).
#[tokio::test]
async fn presence_of_a_channel_is_only_for_those_who_may_read_it() {
    let s = secured().await;
    let alice = token("alice", json!({}));
    let ops = token("ops", json!({"role": "admin"}));
    let root = token("root", json!({"role": "admin"}));

    // Watchers, all live before root arrives.
    let mut alice_ws = ws_connect(&s.server, &format!("?token={alice}"))
        .await
        .unwrap();
    alice_ws.subscribe("presence").await;
    let mut alice_sse = SseReader::open(
        s.server.addr,
        &format!("/api/v1/realtime/presence?token={alice}"),
        "",
    )
    .await;
    assert_eq!(alice_sse.status, 200);
    assert_eq!(alice_sse.next().await.unwrap().event, "connected");
    let mut alice_all = subscribe_as(&s.server, Some(&alice), text_subscription("*", None))
        .await
        .unwrap();
    let mut alice_grpc = subscribe_as(&s.server, Some(&alice), text_subscription("presence", None))
        .await
        .unwrap();
    let mut ops_ws = ws_connect(&s.server, &format!("?token={ops}"))
        .await
        .unwrap();
    ops_ws.subscribe("presence").await;

    // Root connects, then joins admin.secret (alice may not read it) and
    // posts (she may).
    let mut root_ws = ws_connect(&s.server, &format!("?token={root}"))
        .await
        .unwrap();
    root_ws.subscribe("admin.secret").await;
    root_ws.subscribe("posts").await;

    let last = seen("user.joined", json!("posts"));
    let visible = vec![seen("user.joined", Value::Null), last.clone()];
    // Every transport's view first, then one comparison: a leak shows on
    // each transport at once.
    let got = vec![
        ("websocket", ws_presence_until(&mut alice_ws, &last).await),
        ("sse", sse_presence_until(&mut alice_sse, &last).await),
        ("grpc *", grpc_presence_until(&mut alice_all, &last).await),
        (
            "grpc presence",
            grpc_presence_until(&mut alice_grpc, &last).await,
        ),
    ];
    let want: Vec<_> = ["websocket", "sse", "grpc *", "grpc presence"]
        .into_iter()
        .map(|transport| (transport, visible.clone()))
        .collect();
    assert_eq!(got, want, "alice must not see root join admin.secret");
    assert_eq!(
        ws_presence_until(&mut ops_ws, &last).await,
        vec![
            seen("user.joined", Value::Null),
            seen("user.joined", json!("admin.secret")),
            last.clone(),
        ],
        "an admin sees every channel"
    );

    // Snapshots: refused like subscribing to the channel.
    let presence = |query: String| {
        let addr = s.server.addr;
        async move {
            let (status, body) = http(addr, "GET", &format!("/api/v1/presence{query}"), "")
                .await
                .unwrap();
            (status, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let mut client = s.server.grpc().await;
    let request = |channel: &str, credential: &str| {
        authorized(
            proto::GetPresenceRequest {
                channel: channel.into(),
            },
            Some(credential),
        )
    };
    let watch = |channel: &str, credential: &str| {
        authorized(
            proto::WatchPresenceRequest {
                channel: channel.into(),
            },
            Some(credential),
        )
    };
    // Alice asks for admin.secret on every surface; all answers, then one
    // comparison.
    let (status, body) = presence(format!("?channel=admin.secret&token={alice}")).await;
    let rest = format!("{status} {}", body["error"]["code"]);
    let get = match client.get_presence(request("admin.secret", &alice)).await {
        Ok(snapshot) => format!("ok: {} users", snapshot.into_inner().count),
        Err(status) => format!("{:?}", status.code()),
    };
    let watched = match client.watch_presence(watch("admin.secret", &alice)).await {
        Ok(_) => "ok".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    };
    assert_eq!(
        [rest.as_str(), get.as_str(), watched.as_str()],
        [
            "403 \"permission_denied\"",
            "PermissionDenied",
            "PermissionDenied"
        ],
        "REST, GetPresence, WatchPresence"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may not subscribe on \"admin.secret\""),
        "refused like subscribing: {body}"
    );
    let (status, _) = presence("?channel=admin.secret".into()).await;
    assert_eq!(status, 401);
    let (status, body) = presence(format!("?channel=admin.secret&token={ops}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["users"][0]["user_id"], "root");
    let (status, body) = presence(format!("?channel=posts&token={alice}")).await;
    assert_eq!((status, body["count"].clone()), (200, json!(1)));
    let (status, body) = presence(format!("?token={alice}")).await;
    assert_eq!(status, 200, "who is connected: any authenticated user");
    assert!(body["count"].as_u64().unwrap() >= 3, "{body}");
    let (status, _) = presence(String::new()).await;
    assert_eq!(status, 401);

    let snapshot = client
        .get_presence(request("admin.secret", &ops))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snapshot.users[0].user_id, "root");
    let mut alice_watch = client
        .watch_presence(watch("posts", &alice))
        .await
        .unwrap()
        .into_inner();
    let first = within("the snapshot", alice_watch.message())
        .await
        .unwrap()
        .unwrap();
    let Some(proto::presence_update::Kind::Snapshot(snapshot)) = first.kind else {
        panic!("a snapshot first, got {first:?}");
    };
    assert_eq!(snapshot.users[0].user_id, "root");

    // Leaving: the same rule.
    root_ws.close().await;
    let last = seen("user.left", Value::Null);
    let visible = vec![seen("user.left", json!("posts")), last.clone()];
    let got = vec![
        ("websocket", ws_presence_until(&mut alice_ws, &last).await),
        ("sse", sse_presence_until(&mut alice_sse, &last).await),
        ("grpc *", grpc_presence_until(&mut alice_all, &last).await),
        (
            "grpc presence",
            grpc_presence_until(&mut alice_grpc, &last).await,
        ),
    ];
    let want: Vec<_> = ["websocket", "sse", "grpc *", "grpc presence"]
        .into_iter()
        .map(|transport| (transport, visible.clone()))
        .collect();
    assert_eq!(got, want, "alice must not see root leave admin.secret");
    let mut ops_saw = ws_presence_until(&mut ops_ws, &last).await;
    ops_saw.sort_by_key(|e| e.2.to_string());
    let mut all = vec![
        seen("user.left", json!("admin.secret")),
        seen("user.left", json!("posts")),
        last,
    ];
    all.sort_by_key(|e| e.2.to_string());
    assert_eq!(ops_saw, all);
    let update = within("alice's watch", alice_watch.message())
        .await
        .unwrap()
        .unwrap();
    let Some(proto::presence_update::Kind::Left(user)) = update.kind else {
        panic!("root left posts, got {update:?}");
    };
    assert_eq!(user.user_id, "root");
}

/// Who is connected at all is the policy's `presence` setting.
#[tokio::test]
async fn who_is_connected_at_all_follows_the_presence_setting() {
    let s = secured_with(r#"presence = "claim:role=admin""#).await;
    let alice = token("alice", json!({}));
    let ops = token("ops", json!({"role": "admin"}));
    let root = token("root", json!({"role": "admin"}));
    let (status, body) = s
        .server
        .get(&format!("/api/v1/presence?token={alice}"))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("see who is connected"), "{body}");
    let (status, _) = s.server.get(&format!("/api/v1/presence?token={ops}")).await;
    assert_eq!(status, 200);
    let (status, _) = s.server.get("/api/v1/presence").await;
    assert_eq!(status, 401);
    let (status, _) = s
        .server
        .get(&format!("/api/v1/presence?token={API_KEY}"))
        .await;
    assert_eq!(status, 200, "the API key subscribes to everything");
    let mut client = s.server.grpc().await;
    let status = client
        .get_presence(authorized(
            proto::GetPresenceRequest::default(),
            Some(&alice),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .watch_presence(authorized(
            proto::WatchPresenceRequest::default(),
            Some(&alice),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Alice's presence subscription sees root join posts, not connect.
    let mut alice_ws = ws_connect(&s.server, &format!("?token={alice}"))
        .await
        .unwrap();
    alice_ws.subscribe("presence").await;
    let mut root_ws = ws_connect(&s.server, &format!("?token={root}"))
        .await
        .unwrap();
    root_ws.subscribe("posts").await;
    let last = seen("user.joined", json!("posts"));
    assert_eq!(
        ws_presence_until(&mut alice_ws, &last).await,
        vec![last.clone()]
    );
}

/// Nobody publishes on `presence`, not even an API key allowed everything
/// or a user granted it: fake joins would pass for real ones.
#[tokio::test]
async fn presence_is_reserved_for_every_credential() {
    let s = secured().await;
    let granted = token("writer", json!({"strom": {"publish": ["presence", "*"]}}));
    let fake = || {
        vec![proto::Event {
            r#type: proto::EventType::UserJoined as i32,
            collection: "presence".into(),
            record_id: "mallory".into(),
            data: Some(strom::edge::grpc::struct_from_json(
                &json!({"user_id": "mallory", "channel": null}),
            )),
            ..Default::default()
        }]
    };
    let mut answers = Vec::new();
    for credential in [API_KEY, granted.as_str()] {
        answers.push(
            match publish_as(&s.server, Some(credential), fake()).await {
                Ok(seqs) => format!("published {seqs:?}"),
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
            },
        );
    }
    let body = json!({"type": "user.joined", "collection": "presence", "record_id": "mallory",
        "data": {"user_id": "mallory", "channel": null}})
    .to_string();
    let (status, reply) = s
        .server
        .post(&format!("/api/v1/publish?token={API_KEY}"), &body)
        .await;
    answers.push(format!("{status}: {reply}"));
    let mut ws = ws_connect(&s.server, &format!("?token={granted}"))
        .await
        .unwrap();
    let reply = ws
        .request(json!({"action": "publish", "channel": "presence", "data": {}, "ack": true}))
        .await;
    answers.push(format!("{}: {}", reply["type"], reply["data"]));
    let refused: Vec<bool> = answers
        .iter()
        .map(|a| {
            (a.starts_with("InvalidArgument") || a.starts_with("400") || a.starts_with("\"error\""))
                && a.contains("reserved")
                && !a.contains("permission")
        })
        .collect();
    assert_eq!(
        refused, [true; 4],
        "gRPC (API key, grant), REST, WebSocket: {answers:#?}"
    );
}

/// A WebSocket opened as one user cannot take another user's token with
/// `auth`, subscribed or not; a fresh token of the same user is fine.
#[tokio::test]
async fn websocket_auth_cannot_switch_to_another_user() {
    let s = secured().await;
    let alice = token("alice", json!({}));
    let bob = token("bob", json!({"role": "admin"}));
    let mut ws = ws_connect(&s.server, &format!("?token={alice}"))
        .await
        .unwrap();
    let reply = ws.request(json!({"action": "auth", "token": bob})).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["data"]["code"], "permission_denied");
    let message = reply["data"]["message"].as_str().unwrap();
    assert!(message.contains("cannot change user"), "{message}");
    assert!(
        message.contains("alice") && message.contains("bob"),
        "{message}"
    );
    // Still alice: bob's admin claim opened nothing.
    let reply = ws
        .request(json!({"action": "subscribe", "collection": "admin.audit"}))
        .await;
    assert_eq!(reply["data"]["code"], "permission_denied", "{reply}");
    let reply = ws
        .request(json!({"action": "auth", "token": API_KEY}))
        .await;
    assert_eq!(reply["data"]["code"], "permission_denied", "{reply}");
    let reply = ws
        .request(json!({"action": "auth", "token": token("alice", json!({}))}))
        .await;
    assert_eq!(reply["type"], "authenticated", "{reply}");
    assert_eq!(reply["data"]["user_id"], "alice");
    // Presence agrees: alice only.
    let (_, body) = s
        .server
        .get(&format!("/api/v1/presence?token={alice}"))
        .await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["count"], 1, "{body}");
    assert_eq!(body["users"][0]["user_id"], "alice");
}

/// In open mode a claimed `user_id=` is who the connection is: a token for
/// someone else cannot take it over either.
#[tokio::test]
async fn websocket_auth_cannot_switch_away_from_a_claimed_user_in_open_mode() {
    let s = Secured::start("open = true\n", ServerConfig::default()).await;
    let server = &s.server;
    let mut ws = ws_connect(server, "?user_id=alice").await.unwrap();
    let reply = ws
        .request(json!({"action": "auth", "token": token("bob", json!({}))}))
        .await;
    assert_eq!(reply["data"]["code"], "permission_denied", "{reply}");
    let reply = ws
        .request(json!({"action": "auth", "token": token("alice", json!({}))}))
        .await;
    assert_eq!(reply["type"], "authenticated", "{reply}");
    let mut anonymous = ws_connect(server, "").await.unwrap();
    let reply = anonymous
        .request(json!({"action": "auth", "token": token("bob", json!({}))}))
        .await;
    assert_eq!(
        reply["type"], "authenticated",
        "an anonymous connection may log in"
    );
}
