//! The Rust client in a few lines: subscribe with a filter, publish, read
//! presence, and resume after a disconnect.
//!
//! Run a server first (`cargo run --release -- serve`), then
//! `cargo run --example quickstart [http://127.0.0.1:8000]`.

use serde_json::json;
use strom::client::{Client, Update, record};

#[tokio::main]
async fn main() -> Result<(), strom::client::ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let mut client = Client::connect(&url).await?;
    // With authentication on: `let client = client.with_token(&token)?;`

    let mut expensive = client
        .subscribe("products", Some("price > 100"), None)
        .await?;
    for (id, price) in [("cheap", 5), ("dear", 500), ("deluxe", 900)] {
        let seq = client
            .publish(record("products", id, json!({"price": price})))
            .await?;
        println!("published {id} as seq {seq}");
    }
    for _ in 0..2 {
        if let Some(Update::Event(event)) = expensive.next().await? {
            println!(
                "received {} (price {})",
                event.record_id, event.data["price"]
            );
        }
    }

    // Resume from the last seq seen: nothing published meanwhile is lost.
    let last = expensive.last_seq();
    drop(expensive);
    client
        .publish(record("products", "while-away", json!({"price": 300})))
        .await?;
    let mut resumed = client
        .subscribe("products", Some("price > 100"), last)
        .await?;
    if let Some(Update::Event(event)) = resumed.next().await? {
        println!("after resuming: {}", event.record_id);
    }

    println!("online now: {:?}", client.presence(None).await?);
    Ok(())
}
