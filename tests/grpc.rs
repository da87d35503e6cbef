//! The gRPC surface over real sockets: Publish, Subscribe with filters,
//! errors, slow subscribers, health, reflection, gRPC-Web and shutdown.

mod common;

use common::*;
use serde_json::json;
use strom::edge::grpc::{json_from_struct, value_from_json};
use strom::engine::EngineConfig;
use strom::proto;
use strom::server::ServerConfig;
use tonic::Code;

fn data(event: &proto::Event) -> serde_json::Value {
    json_from_struct(event.data.as_ref().unwrap())
}

#[tokio::test]
async fn subscribers_receive_exactly_the_matching_events_in_order() {
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(
        &mut client,
        text_subscription("products", Some("price > 100 && category = books")),
    )
    .await;
    let prices = [150, 50, 200, 300, 101, 100];
    let categories = ["books", "books", "books", "toys", "books", "books"];
    let events = prices
        .iter()
        .zip(categories)
        .enumerate()
        .map(|(i, (price, category))| {
            created(
                "products",
                &format!("p{i}"),
                json!({"price": price, "category": category}),
            )
        })
        .collect();
    let seqs = client
        .publish(proto::PublishRequest { events })
        .await
        .unwrap()
        .into_inner()
        .seqs;
    assert_eq!(seqs.len(), 6);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // A final matching event marks the end of what was published.
    client
        .publish(proto::PublishRequest {
            events: vec![created(
                "products",
                "end",
                json!({"price": 999, "category": "books"}),
            )],
        })
        .await
        .unwrap();
    let mut received = Vec::new();
    loop {
        let event = next_event(&mut stream).await;
        received.push((
            event.record_id.clone(),
            data(&event)["price"].clone(),
            event.seq,
        ));
        if event.record_id == "end" {
            break;
        }
    }
    let ids: Vec<&str> = received.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["p0", "p2", "p4", "end"]);
    assert_eq!(received[0].2, seqs[0]);
    assert_eq!(received[1].2, seqs[2]);
    assert_eq!(received[2].1, json!(101));
}

#[tokio::test]
async fn typed_filter_tree_record_id_and_wildcard() {
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let condition = |field: &str, op: proto::Operator, value: serde_json::Value| proto::Filter {
        node: Some(proto::filter::Node::Condition(proto::Condition {
            field: field.into(),
            op: op as i32,
            value: Some(value_from_json(&value)),
        })),
    };
    let tree = proto::Filter {
        node: Some(proto::filter::Node::All(proto::FilterList {
            filters: vec![
                condition("author.name", proto::Operator::Eq, json!("ann")),
                condition("tags", proto::Operator::Contains, json!("rust")),
            ],
        })),
    };
    let mut typed = grpc_subscribe(
        &mut client,
        proto::SubscribeRequest {
            collection: "posts".into(),
            filter: Some(proto::subscribe_request::Filter::Tree(tree)),
            ..Default::default()
        },
    )
    .await;
    let mut one_record = grpc_subscribe(
        &mut client,
        proto::SubscribeRequest {
            collection: "posts".into(),
            record_id: "b".into(),
            ..Default::default()
        },
    )
    .await;
    let mut everything = grpc_subscribe(&mut client, text_subscription("*", None)).await;
    let events = vec![
        created(
            "posts",
            "a",
            json!({"author": {"name": "bob"}, "tags": ["rust"]}),
        ),
        created(
            "posts",
            "b",
            json!({"author": {"name": "ann"}, "tags": ["rust"]}),
        ),
        created("comments", "c", json!({})),
    ];
    client
        .publish(proto::PublishRequest { events })
        .await
        .unwrap();
    assert_eq!(next_event(&mut typed).await.record_id, "b");
    assert_eq!(next_event(&mut one_record).await.record_id, "b");
    let all: Vec<String> = [
        next_event(&mut everything).await,
        next_event(&mut everything).await,
        next_event(&mut everything).await,
    ]
    .into_iter()
    .map(|e| format!("{}/{}", e.collection, e.record_id))
    .collect();
    assert_eq!(all, ["posts/a", "posts/b", "comments/c"]);
}

#[tokio::test]
async fn an_update_leaving_the_filter_is_marked() {
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(
        &mut client,
        text_subscription("orders", Some("status = open")),
    )
    .await;
    let update = |old: &str, new: &str| proto::Event {
        r#type: proto::EventType::RecordUpdated as i32,
        collection: "orders".into(),
        record_id: "o1".into(),
        data: Some(strom::edge::grpc::struct_from_json(&json!({"status": new}))),
        old_data: Some(strom::edge::grpc::struct_from_json(&json!({"status": old}))),
        ..Default::default()
    };
    let events = vec![
        update("new", "open"),       // enters: delivered
        update("open", "closed"),    // leaves: delivered, marked
        update("closed", "shipped"), // neither: nobody
        update("shipped", "open"),   // enters again
    ];
    let seqs = client
        .publish(proto::PublishRequest { events })
        .await
        .unwrap()
        .into_inner()
        .seqs;
    let first = next_event(&mut stream).await;
    assert_eq!((first.seq, first.left_filter), (seqs[0], false));
    let second = next_event(&mut stream).await;
    assert_eq!((second.seq, second.left_filter), (seqs[1], true));
    let third = next_event(&mut stream).await;
    assert_eq!((third.seq, third.left_filter), (seqs[3], false));
}

/// The call failed with INVALID_ARGUMENT and a message holding `parts`.
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, parts: &[&str]) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    for part in parts {
        assert!(
            status.message().contains(part),
            "{:?} lacks {part:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_problem() {
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let bad_filter = client
        .subscribe(text_subscription("posts", Some("price >")))
        .await;
    assert_invalid(bad_filter, &["column 8", "expected a value"]);
    let bad_name = client.subscribe(text_subscription("bad name", None)).await;
    assert_invalid(bad_name, &["collection"]);
    assert_invalid(client.subscribe(text_subscription("", None)).await, &[]);

    let empty_condition = proto::SubscribeRequest {
        collection: "posts".into(),
        filter: Some(proto::subscribe_request::Filter::Tree(proto::Filter {
            node: Some(proto::filter::Node::Condition(proto::Condition {
                field: "price".into(),
                op: proto::Operator::Gt as i32,
                value: None,
            })),
        })),
        ..Default::default()
    };
    assert_invalid(client.subscribe(empty_condition).await, &["price"]);

    let empty = client
        .publish(proto::PublishRequest { events: vec![] })
        .await;
    assert_invalid(empty, &["no event"]);
    let mut untyped = created("posts", "x", json!({}));
    untyped.r#type = 0;
    let events = vec![created("posts", "ok", json!({})), untyped];
    let untyped = client.publish(proto::PublishRequest { events }).await;
    assert_invalid(untyped, &["events[1]"]);
}

#[tokio::test]
async fn a_slow_subscriber_is_cut_off_without_delaying_others() {
    let server = TestServer::start(ServerConfig {
        engine: EngineConfig {
            queue_capacity: 64,
            ..EngineConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.grpc().await;
    // Separate HTTP/2 connections, so the slow one's flow control is its own.
    let mut slow = grpc_subscribe(&mut server.grpc().await, text_subscription("feed", None)).await;
    let mut fast = grpc_subscribe(&mut server.grpc().await, text_subscription("feed", None)).await;
    // The fast subscriber keeps up: it reads each batch before the next is
    // published. The slow one reads nothing until the end.
    const BATCHES: usize = 200;
    let padding = "x".repeat(4096);
    for batch in 0..BATCHES {
        let events = (0..20)
            .map(|i| created("feed", &format!("{batch}-{i}"), json!({"pad": padding})))
            .collect();
        let seqs = client
            .publish(proto::PublishRequest { events })
            .await
            .unwrap()
            .into_inner()
            .seqs;
        for seq in seqs {
            assert_eq!(
                next_event(&mut fast).await.seq,
                seq,
                "in order, none missing"
            );
        }
    }
    // The slow one, never read so far, gets what was queued, then the reason.
    let mut got = 0;
    let status = loop {
        match within("the slow stream", slow.message()).await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert!(
        got < BATCHES * 20,
        "cut off before the end, after {got} events"
    );
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("too slow"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::memory().await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "strom.v1.Realtime".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "strom.v1.Realtime".into(),
        )),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("expected descriptors, got {response:?}");
    };
    use prost::Message;
    let file = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .find(|f| f.package() == "strom.v1")
        .expect("the strom.v1 file");
    let methods: Vec<&str> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        ["Publish", "Subscribe", "GetPresence", "WatchPresence"]
    );

    // v1alpha too, for clients that speak only it (Python's grpcio-reflection).
    use tonic_reflection::pb::v1alpha;
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .expect("v1alpha is served")
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("expected the service list, got {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"strom.v1.Realtime"), "{names:?}");
}

#[tokio::test]
async fn grpc_web_publish_over_http1() {
    use prost::Message;
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("web", None)).await;
    let request = proto::PublishRequest {
        events: vec![created("web", "w1", json!({"from": "browser"}))],
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(request.len() as u32).to_be_bytes());
    body.extend_from_slice(&request);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /strom.v1.Realtime/Publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nOrigin: http://example.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    within("the gRPC-Web response", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web"),
        "{head}"
    );
    assert!(head.contains("access-control-allow-origin"), "{head}");
    let event = next_event(&mut stream).await;
    assert_eq!(event.record_id, "w1");
    // The body holds the seq of that event (the frame may be chunked).
    let body = &response[split + 4..];
    let encoded = proto::PublishResponse {
        seqs: vec![event.seq],
        duplicates: Vec::new(),
    }
    .encode_to_vec();
    assert!(
        body.windows(encoded.len()).any(|w| w == encoded.as_slice()),
        "the response frame carries seq {}",
        event.seq
    );
    assert!(
        String::from_utf8_lossy(body).contains("grpc-status:0"),
        "trailers say OK"
    );
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let mut server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    server.begin_stop();
    let status = within("the stream to end", stream.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("shutting down"),
        "{}",
        status.message()
    );
}
