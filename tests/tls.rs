//! TLS on the one port: gRPC over HTTP/2 chosen by ALPN, HTTP/1.1 for
//! REST, a plain-TCP client turned away without hanging, and unreadable
//! files refused at startup with a clear error. The certificate is made
//! at test time.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use strom::proto;
use strom::proto::realtime_client::RealtimeClient;
use strom::server::{Server, ServerConfig};
use strom::tls::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types};

/// A self-signed certificate for `localhost`, written to files.
struct Certificate {
    files: TlsFiles,
    der: pki_types::CertificateDer<'static>,
    _dir: TempDir,
}

fn certificate() -> Certificate {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = TempDir::new("tls");
    let files = TlsFiles {
        cert: dir.0.join("cert.pem"),
        key: dir.0.join("key.pem"),
    };
    std::fs::write(&files.cert, made.cert.pem()).unwrap();
    std::fs::write(&files.key, made.signing_key.serialize_pem()).unwrap();
    Certificate {
        files,
        der: made.cert.der().clone(),
        _dir: dir,
    }
}

/// Serves TLS on a free port until the test ends.
async fn tls_server(files: TlsFiles) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        tls: Some(files),
        ..ServerConfig::default()
    };
    let server = Server::start(config).await.expect("the server starts");
    tokio::spawn(server.serve(listener, std::future::pending()));
    addr
}

/// A TLS connection trusting only `certificate`, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    certificate: &Certificate,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = pki_types::ServerName::try_from("localhost").unwrap();
    within(
        "the TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("the handshake succeeds")
}

#[tokio::test]
async fn grpc_and_rest_are_served_over_tls() {
    let certificate = certificate();
    let addr = tls_server(certificate.files.clone()).await;

    // gRPC: HTTP/2, chosen by ALPN.
    let stream = connect(addr, &certificate, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut stream = Some(stream);
    let channel = tonic::transport::Endpoint::from_static("https://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = stream.take().expect("one connection");
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream)) }
        }))
        .await
        .unwrap();
    let mut client = RealtimeClient::new(channel);
    let reply = client
        .publish(proto::PublishRequest {
            events: vec![created(
                "posts",
                "a",
                serde_json::json!({"title": "over TLS"}),
            )],
        })
        .await
        .expect("publish over TLS");
    assert_eq!(reply.into_inner().seqs, [1]);

    // REST: HTTP/1.1.
    let mut stream = connect(addr, &certificate, &[b"http/1.1"]).await;
    stream
        .write_all(b"GET /api/v1/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    within("the answer", stream.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"head_seq\":1"), "{answer}");
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_closed_not_left_hanging() {
    let certificate = certificate();
    let addr = tls_server(certificate.files.clone()).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within("the server to close", tcp.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "served without TLS");
}

#[tokio::test]
async fn unreadable_or_mismatched_files_are_refused_at_startup() {
    let certificate = certificate();
    let other = self::certificate();
    let start = |files: TlsFiles| async move {
        let config = ServerConfig {
            tls: Some(files),
            ..ServerConfig::default()
        };
        match Server::start(config).await {
            Ok(_) => panic!("started with bad TLS files"),
            Err(error) => error.to_string(),
        }
    };
    let missing = start(TlsFiles {
        cert: certificate.files.cert.with_file_name("missing.pem"),
        ..certificate.files.clone()
    })
    .await;
    assert!(
        missing.contains("cannot read the TLS certificate") && missing.contains("missing.pem"),
        "{missing}"
    );
    let mismatched = start(TlsFiles {
        key: other.files.key.clone(),
        ..certificate.files.clone()
    })
    .await;
    assert!(mismatched.contains("do not fit together"), "{mismatched}");
}
