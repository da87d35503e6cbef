//! What browsers and operators meet at the edge: stats and metrics behind
//! a credential unless the server is open, CORS that names the headers it
//! allows, WebSocket handshakes checked against the allowed origins, and
//! log lines a log shipper can read.

mod common;

use common::*;
use strom::auth::AuthSettings;
use strom::server::ServerConfig;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const POLICY: &str = r#"
[[api_keys]]
name = "backend"
key = "backend-key-0123456789"
publish = ["*"]
subscribe = ["*"]
"#;

async fn get(server: &TestServer, path: &str, headers: &str) -> (u16, String) {
    let (status, _, body) = http_with(server.addr, "GET", path, headers, "")
        .await
        .unwrap();
    (status, body)
}

#[tokio::test]
async fn stats_and_metrics_need_an_api_key_when_auth_is_enforced() {
    let s = Secured::start(POLICY, ServerConfig::default()).await;
    let server = &s.server;
    let user = token("alice", serde_json::json!({}));
    for path in ["/api/v1/stats", "/metrics"] {
        let (status, body) = get(server, path, "").await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("API key"), "{body}");
        let (status, _) = get(server, path, &format!("Authorization: Bearer {user}\r\n")).await;
        assert_eq!(status, 403, "{path}: a user token is not enough");
        let (status, body) = get(server, path, "X-Api-Key: backend-key-0123456789\r\n").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = get(server, "/healthz", "").await;
    assert_eq!(status, 200, "health stays open");
}

#[tokio::test]
async fn with_an_ops_token_stats_and_metrics_need_it_even_when_open() {
    let server = TestServer::start(ServerConfig {
        ops_token: Some("ops-secret".into()),
        ..ServerConfig::default()
    })
    .await;
    for path in ["/api/v1/stats", "/metrics"] {
        let (status, body) = get(&server, path, "").await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("--ops-token"), "{body}");
        let (status, _) = get(&server, path, "Authorization: Bearer ops-secrex\r\n").await;
        assert_eq!(status, 401, "{path}: a wrong token");
        let (status, body) = get(&server, path, "Authorization: Bearer ops-secret\r\n").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test]
async fn cors_names_the_headers_a_bearer_request_needs() {
    let server = TestServer::memory().await;
    let preflight = "Origin: http://app.test\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization,content-type\r\n";
    let (status, head, _) = http_with(server.addr, "OPTIONS", "/api/v1/publish", preflight, "")
        .await
        .unwrap();
    assert!((200..300).contains(&status), "{head}");
    let allowed = head
        .lines()
        .find_map(|l| l.strip_prefix("access-control-allow-headers: "))
        .expect("allowed headers");
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(!allowed.contains('*'), "{allowed}");
    let methods = head
        .lines()
        .find_map(|l| l.strip_prefix("access-control-allow-methods: "))
        .expect("allowed methods");
    assert!(
        methods.contains("POST") || methods.contains("post"),
        "{methods}"
    );
}

#[tokio::test]
async fn cross_origin_requests_are_open_only_in_open_mode_until_origins_are_listed() {
    let preflight = "Origin: http://app.test\r\nAccess-Control-Request-Method: POST\r\n";
    let allowed_origin = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("access-control-allow-origin: "))
            .map(str::to_owned)
    };
    let open = TestServer::memory().await;
    let (_, head, _) = http_with(open.addr, "OPTIONS", "/api/v1/publish", preflight, "")
        .await
        .unwrap();
    assert_eq!(allowed_origin(&head).as_deref(), Some("*"), "{head}");

    let enforced = TestServer::start(ServerConfig {
        auth: AuthSettings {
            jwt_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let (_, head, _) = http_with(enforced.addr, "OPTIONS", "/api/v1/publish", preflight, "")
        .await
        .unwrap();
    assert_eq!(allowed_origin(&head), None, "{head}");

    let listed = TestServer::start(ServerConfig {
        auth: AuthSettings {
            jwt_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        cors_origins: vec!["http://app.test".into()],
        ..ServerConfig::default()
    })
    .await;
    let (_, head, _) = http_with(listed.addr, "OPTIONS", "/api/v1/publish", preflight, "")
        .await
        .unwrap();
    assert_eq!(
        allowed_origin(&head).as_deref(),
        Some("http://app.test"),
        "{head}"
    );
}

async fn handshake(server: &TestServer, origin: Option<&str>) -> Result<(), u16> {
    let url = format!("ws://{}/api/v1/ws/realtime", server.addr);
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn websocket_handshakes_from_other_origins_are_refused_when_origins_are_set() {
    let server = TestServer::start(ServerConfig {
        cors_origins: vec!["http://app.test".into()],
        ..ServerConfig::default()
    })
    .await;
    assert_eq!(handshake(&server, Some("http://evil.test")).await, Err(403));
    assert_eq!(handshake(&server, Some("http://app.test")).await, Ok(()));
    assert_eq!(
        handshake(&server, None).await,
        Ok(()),
        "clients that are not browsers send no origin"
    );
    let open = TestServer::memory().await;
    assert_eq!(handshake(&open, Some("http://evil.test")).await, Ok(()));
}

/// The first line `strom serve` writes to stderr (a pipe, not a terminal)
/// with `args`: the open-mode warning.
fn first_log_line(args: &[&str]) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strom"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("STROM_LOG", "warn")
        .env_remove("STROM_LOG_FORMAT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start strom");
    let stderr = child.stderr.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stderr).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let line = line_rx.recv_timeout(PATIENCE).expect("a log line");
    let _ = child.kill();
    let _ = child.wait();
    line
}

#[test]
fn logs_are_plain_text_off_a_terminal_or_json_on_request() {
    let text = first_log_line(&[]);
    assert!(text.contains("open mode"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "no colour codes in a pipe: {text:?}"
    );

    let json = first_log_line(&["--log-format", "json"]);
    let line: serde_json::Value = serde_json::from_str(&json).expect("a JSON object");
    assert_eq!(line["level"], "WARN", "{line}");
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("open mode"),
        "{line}"
    );
}

#[tokio::test]
async fn every_log_line_about_a_connection_names_it() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strom"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("STROM_LOG", "strom=debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start strom");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = stdout.next().expect("the address line").unwrap();
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap()
        .parse()
        .unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = serde_json::from_str(&line).expect("every line is JSON");
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut client = WsClient::connect(addr, "").await.unwrap();
    let id = client.greeting["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.subscribe("posts").await;
    client.close().await;

    let mut seen = Vec::new();
    while !seen.contains(&"connection closed".to_owned()) {
        let line = line_rx.recv_timeout(PATIENCE).expect("a log line");
        let fields = &line["fields"];
        let message = fields["message"].as_str().unwrap_or_default().to_owned();
        if message.contains("connection") || message.contains("subscribed") {
            assert_eq!(fields["connection"], id.as_str(), "{line}");
            seen.push(message);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen,
        ["connection opened", "subscribed", "connection closed"],
        "the connection's life, each line naming it"
    );
}

#[tokio::test]
async fn the_ops_token_reads_presence_but_no_events() {
    let s = Secured::start(
        POLICY,
        ServerConfig {
            ops_token: Some("ops-secret".into()),
            ..ServerConfig::default()
        },
    )
    .await;
    let ops = "Authorization: Bearer ops-secret\r\n";
    let (status, body) = get(&s.server, "/api/v1/presence", ops).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(&s.server, "/api/v1/presence", "").await;
    assert_eq!(status, 401, "presence still needs a credential");
    let (status, _, _) = sse_body(s.server.addr, "/api/v1/realtime/posts", ops).await;
    assert_eq!(status, 401, "the ops token is no subscriber's credential");
    // The better-query dialect's presence takes it the same way.
    let users = "/better-query/realtime/channel/users?channel=room";
    let (status, body) = get(&s.server, users, ops).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(&s.server, users, "").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_bearer_scheme_is_read_in_any_case() {
    let s = Secured::start(POLICY, ServerConfig::default()).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let credential = format!("Authorization: {scheme} backend-key-0123456789\r\n");
        let (status, body) = get(&s.server, "/api/v1/stats", &credential).await;
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    let (status, _) = get(&s.server, "/api/v1/stats", "Authorization: Basic eDp5\r\n").await;
    assert_eq!(status, 401, "another scheme is no bearer credential");
}

#[tokio::test]
async fn a_query_or_path_that_does_not_decode_gets_the_json_error() {
    let server = TestServer::memory().await;
    for path in [
        "/api/v1/presence?token=a&token=b",
        "/api/v1/realtime/posts?query=a&query=b",
        "/api/v1/ws/realtime?token=a&token=b",
        "/better-query/realtime/channel/users?channel=a&channel=b",
        "/api/v1/realtime/%ff",
    ] {
        let (status, head, body) = http_with(server.addr, "GET", path, "", "").await.unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        assert!(head.contains("application/json"), "{path}: {head}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "invalid_argument", "{path}: {body}");
    }
}
