//! The Rust client against a real server, and the example that shows it.

mod common;

use common::*;
use serde_json::json;
use strom::client::{Client, Update, record};
use strom::event::EventType;

#[tokio::test]
async fn the_client_publishes_subscribes_resumes_and_reads_presence() {
    let server = TestServer::memory().await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let mut subscription = client
        .subscribe("orders", Some("status = open"), None)
        .await
        .unwrap();
    let seqs = client
        .publish_all(vec![
            record("orders", "o1", json!({"status": "open"})),
            record("orders", "o2", json!({"status": "done"})),
        ])
        .await
        .unwrap();
    let moved = strom::event::Event {
        event_type: EventType::RecordUpdated,
        old_data: Some(json!({"status": "open"})),
        ..record("orders", "o1", json!({"status": "done"}))
    };
    let moved_seq = client.publish(moved).await.unwrap();
    let Some(Update::Event(first)) = subscription.next().await.unwrap() else {
        panic!("an event");
    };
    assert_eq!((first.record_id.as_str(), first.seq), ("o1", seqs[0]));
    let Some(Update::LeftFilter(left)) = subscription.next().await.unwrap() else {
        panic!("the update leaving the filter");
    };
    assert_eq!(left.seq, moved_seq);
    assert_eq!(subscription.last_seq(), Some(moved_seq));

    let mut resumed = client
        .subscribe("orders", None, Some(seqs[0]))
        .await
        .unwrap();
    let Some(Update::Event(event)) = resumed.next().await.unwrap() else {
        panic!("a replayed event");
    };
    assert_eq!(event.seq, seqs[1]);

    let _watcher = WsClient::connect(server.addr, "?user_id=zoe")
        .await
        .unwrap();
    let users = client.presence(None).await.unwrap();
    assert_eq!(users[0].user_id, "zoe");

    let error = client
        .subscribe("orders", Some("status >"), None)
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("column 9"), "{error}");
}

#[tokio::test]
async fn the_quickstart_example_runs() {
    let server = TestServer::memory().await;
    // `cargo test` compiles examples but does not leave a runnable binary;
    // `cargo run` builds (once) and runs it.
    let output = tokio::process::Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "quickstart", "--"])
        .arg(server.url())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("received dear"), "{stdout}");
    assert!(stdout.contains("received deluxe"), "{stdout}");
    assert!(stdout.contains("after resuming: while-away"), "{stdout}");
}
