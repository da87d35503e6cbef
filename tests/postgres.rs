//! Postgres change capture against a real PostgreSQL: table changes reach
//! subscribers with filters, whole and in commit order, none lost while
//! strom is down, one consumer at a time with take-over after SIGKILL.

mod common;

use common::*;
use serde_json::{Value, json};
use strom::capture::postgres::{self, PostgresConfig};
use strom::proto;
use strom::server::ServerConfig;

async fn with_tables(pg: &PostgresServer) -> tokio_postgres::Client {
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, notes text);
         CREATE TABLE orders (shop text, number int, status text, PRIMARY KEY (shop, number));",
    )
    .await
    .unwrap();
    let collection = postgres::enable(&pg.url, "strom", "public.products", None)
        .await
        .unwrap();
    assert_eq!(collection, "public.products");
    // The SQL function users may call themselves, with an alias.
    db.execute(
        "SELECT strom.enable_realtime('public', 'orders', 'orders')",
        &[],
    )
    .await
    .unwrap();
    db
}

fn capture_config(pg: &PostgresServer) -> ServerConfig {
    ServerConfig {
        postgres: Some(PostgresConfig::new(pg.url.clone())),
        ..ServerConfig::default()
    }
}

async fn next_ws_event(client: &mut WsClient) -> Value {
    let message = client.next().await.expect("connected");
    assert_eq!(message["type"], "event", "{message}");
    message["data"].clone()
}

#[tokio::test]
async fn inserts_updates_and_deletes_reach_filtered_subscribers() {
    let pg = PostgresServer::start();
    let db = with_tables(&pg).await;
    let server = TestServer::start(capture_config(&pg)).await;
    let mut ws = WsClient::connect(server.addr, "").await.unwrap();
    let reply = ws
        .request(json!({"action": "subscribe", "collection": "public.products", "filter": "price > 100"}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    let mut client = server.grpc().await;
    let mut orders = grpc_subscribe(
        &mut client,
        text_subscription("orders", Some("status = open")),
    )
    .await;

    db.execute("INSERT INTO products VALUES (1, 'pen', 2, NULL)", &[])
        .await
        .unwrap();
    db.execute("INSERT INTO products VALUES (2, 'desk', 250, NULL)", &[])
        .await
        .unwrap();
    let created = next_ws_event(&mut ws).await;
    assert_eq!(created["type"], "record.created");
    assert_eq!(created["record_id"], "2");
    assert_eq!(created["data"]["name"], "desk");
    assert_eq!(created["data"]["price"], 250);
    assert!(
        created["id"].as_str().unwrap().starts_with("pg:"),
        "{created}"
    );

    db.execute("UPDATE products SET price = 300 WHERE id = 2", &[])
        .await
        .unwrap();
    let updated = next_ws_event(&mut ws).await;
    assert_eq!(updated["type"], "record.updated");
    assert_eq!(updated["old_data"]["price"], 250);
    assert_eq!(updated["data"]["price"], 300);
    db.execute("UPDATE products SET price = 50 WHERE id = 2", &[])
        .await
        .unwrap();
    let leaving = next_ws_event(&mut ws).await;
    assert_eq!(leaving["left_filter"], true);
    db.execute("UPDATE products SET price = 500 WHERE id = 2", &[])
        .await
        .unwrap();
    assert_eq!(next_ws_event(&mut ws).await["type"], "record.updated");
    db.execute("DELETE FROM products WHERE id = 2", &[])
        .await
        .unwrap();
    let deleted = next_ws_event(&mut ws).await;
    assert_eq!(deleted["type"], "record.deleted");
    assert_eq!(deleted["data"]["name"], "desk", "the deleted row, complete");
    assert_eq!(deleted["old_data"]["price"], 500);

    // A composite key; the alias; a rollback emits nothing; a big row whole.
    db.batch_execute(
        "BEGIN; INSERT INTO orders VALUES ('eu', 1, 'open'); ROLLBACK;
         INSERT INTO orders VALUES ('eu', 2, 'open');",
    )
    .await
    .unwrap();
    let order = next_event(&mut orders).await;
    assert_eq!(
        (order.collection.as_str(), order.record_id.as_str()),
        ("orders", "eu,2")
    );
    assert_eq!(order.r#type, proto::EventType::RecordCreated as i32);
    let notes = "x".repeat(100 * 1024);
    db.execute(
        "INSERT INTO products VALUES (3, 'archive', 1000, $1)",
        &[&notes],
    )
    .await
    .unwrap();
    let big = next_ws_event(&mut ws).await;
    assert_eq!(big["data"]["notes"].as_str().unwrap().len(), 100 * 1024);
}

#[tokio::test]
async fn changes_made_while_strom_is_down_arrive_once_in_order() {
    let pg = PostgresServer::start();
    let db = with_tables(&pg).await;
    let first = TestServer::start(capture_config(&pg)).await;
    let mut client = first.grpc().await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("public.products", None)).await;
    db.execute("INSERT INTO products VALUES (1, 'one', 1, NULL)", &[])
        .await
        .unwrap();
    assert_eq!(next_event(&mut stream).await.record_id, "1");
    first.stop().await;

    for id in 2..=4 {
        db.execute(
            "INSERT INTO products VALUES ($1, 'while down', 1, NULL)",
            &[&id],
        )
        .await
        .unwrap();
    }
    db.execute("UPDATE products SET name = 'renamed' WHERE id = 3", &[])
        .await
        .unwrap();

    let second = TestServer::start(capture_config(&pg)).await;
    let mut client = second.grpc().await;
    // Everything since the start of this node's log: nothing older was lost.
    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("public.products", None)
    };
    let mut stream = grpc_subscribe(&mut client, request).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = next_event(&mut stream).await;
        seen.push(format!("{}:{}", event.record_id, event.r#type));
    }
    let created = proto::EventType::RecordCreated as i32;
    let updated = proto::EventType::RecordUpdated as i32;
    assert_eq!(
        seen,
        [
            format!("2:{created}"),
            format!("3:{created}"),
            format!("4:{created}"),
            format!("3:{updated}")
        ],
        "in commit order"
    );
    db.execute("INSERT INTO products VALUES (5, 'after', 1, NULL)", &[])
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream).await.record_id,
        "5",
        "and nothing twice"
    );
    let status = postgres::slot_state(&db, "strom").await.unwrap().unwrap();
    assert_eq!(status.wal_status, "reserved");
}

#[tokio::test]
async fn one_node_reads_the_slot_and_another_takes_over_after_sigkill() {
    let pg = PostgresServer::start();
    let db = with_tables(&pg).await;
    let nats = NatsServer::start();
    let args = [
        "--nats-url",
        nats.url.as_str(),
        "--postgres-url",
        pg.url.as_str(),
    ];
    let mut a = StromProcess::start(&args);
    let b = StromProcess::start(&args);
    let mut on_b = WsClient::connect(b.addr, "").await.unwrap();
    on_b.subscribe("public.products").await;
    db.execute("INSERT INTO products VALUES (1, 'first', 1, NULL)", &[])
        .await
        .unwrap();
    assert_eq!(next_ws_event(&mut on_b).await["record_id"], "1");
    let holders: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 1, "exactly one node reads the slot");

    // A started first, so it holds the lock; it dies without a goodbye.
    a.kill();
    db.execute("INSERT INTO products VALUES (2, 'second', 1, NULL)", &[])
        .await
        .unwrap();
    let taken_over = next_ws_event(&mut on_b).await;
    assert_eq!(taken_over["record_id"], "2", "B took over");
    db.execute("INSERT INTO products VALUES (3, 'third', 1, NULL)", &[])
        .await
        .unwrap();
    assert_eq!(
        next_ws_event(&mut on_b).await["record_id"],
        "3",
        "each change once"
    );
}

#[tokio::test]
async fn bad_setups_are_refused_with_clear_errors() {
    let pg = PostgresServer::start_with(&["wal_level=replica"]);
    let error = postgres::prepare(&PostgresConfig::new(pg.url.clone()))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("set wal_level = logical"),
        "{error}"
    );
    let error = postgres::enable("host=127.0.0.1 port=1 user=x", "strom", "t", None)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("cannot connect to PostgreSQL"),
        "{error}"
    );

    let pg = PostgresServer::start();
    let error = postgres::enable(&pg.url, "strom", "public.missing", Some("bad name"))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("invalid collection name"),
        "{error}"
    );
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE keyless (a int)")
        .await
        .unwrap();
    let error = postgres::enable(&pg.url, "strom", "keyless", None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("has no primary key"), "{error}");
}

#[tokio::test]
async fn a_lost_slot_is_reported_with_a_resync_event_and_capture_goes_on() {
    let pg = PostgresServer::start_with(&["max_slot_wal_keep_size=1MB"]);
    let db = with_tables(&pg).await;
    // With strom stopped, far more WAL than the slot may keep.
    db.batch_execute(
        "CREATE TABLE filler AS SELECT g, repeat('x', 2000) AS pad FROM generate_series(1, 20000) g",
    )
    .await
    .unwrap();
    within("the slot to be lost", async {
        loop {
            db.batch_execute("SELECT pg_switch_wal(); CHECKPOINT;")
                .await
                .unwrap();
            let state = postgres::slot_state(&db, "strom").await.unwrap().unwrap();
            if state.wal_status == "lost" {
                break;
            }
        }
    })
    .await;

    let server = TestServer::start(capture_config(&pg)).await;
    let mut client = server.grpc().await;
    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("*", None)
    };
    let mut stream = grpc_subscribe(&mut client, request).await;
    let mut resynced = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut stream).await;
        assert_eq!(event.r#type, proto::EventType::CollectionUpdated as i32);
        let data = strom::edge::grpc::json_from_struct(event.data.as_ref().unwrap());
        assert_eq!(data["resync"], true);
        resynced.push(event.collection);
    }
    resynced.sort();
    assert_eq!(resynced, ["orders", "public.products"]);
    // A fresh slot: new changes flow again.
    db.execute("INSERT INTO products VALUES (9, 'new', 1, NULL)", &[])
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(
        (event.collection.as_str(), event.record_id.as_str()),
        ("public.products", "9")
    );
}

/// Fluxbase's way (seed 002): `SELECT enable_realtime('public','products')`
/// in SQL, then its WebSocket protocol on `/realtime` sees the table's
/// INSERT, UPDATE and DELETE; `disable_realtime` stops them.
#[tokio::test]
async fn fluxbase_clients_see_table_changes_enabled_from_sql() {
    let pg = PostgresServer::start();
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE products (id int PRIMARY KEY, name text, price numeric)")
        .await
        .unwrap();
    // What `strom serve --postgres` installs at start-up.
    postgres::install(&db, &PostgresConfig::new(pg.url.clone()).slot)
        .await
        .unwrap();
    db.execute("SELECT enable_realtime('public', 'products')", &[])
        .await
        .unwrap();
    let server = TestServer::start(capture_config(&pg)).await;
    use futures_util::{SinkExt, StreamExt};
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/realtime", server.addr))
        .await
        .unwrap();
    let (mut sink, mut frames) = socket.split();
    let subscribe = json!({"type": "subscribe", "channel": "table:public.products"});
    sink.send(tokio_tungstenite::tungstenite::Message::text(
        subscribe.to_string(),
    ))
    .await
    .unwrap();
    let mut next = async || -> Value {
        let frame = within("a frame", frames.next()).await.unwrap().unwrap();
        serde_json::from_str(frame.to_text().unwrap()).unwrap()
    };
    assert_eq!(next().await["payload"]["subscribed"], true);

    db.batch_execute(
        "INSERT INTO products VALUES (123, 'New Product', 99.99);
         UPDATE products SET name = 'Updated Product', price = 149.99 WHERE id = 123;
         DELETE FROM products WHERE id = 123;",
    )
    .await
    .unwrap();
    let new = json!({"id": 123, "name": "New Product", "price": 99.99});
    let updated = json!({"id": 123, "name": "Updated Product", "price": 149.99});
    let change = |payload: Value| json!({"type": "broadcast", "channel": "table:public.products", "payload": payload});
    assert_eq!(
        next().await,
        change(json!({"type": "INSERT", "table": "products", "schema": "public", "record": new}))
    );
    assert_eq!(
        next().await,
        change(
            json!({"type": "UPDATE", "table": "products", "schema": "public", "record": updated, "old_record": new})
        )
    );
    assert_eq!(
        next().await,
        change(
            json!({"type": "DELETE", "table": "products", "schema": "public", "record": null, "old_record": updated})
        )
    );
    let (status, body) = server.get("/api/realtime/stats").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"connections": 1, "channels": 1})
    );

    db.execute("SELECT disable_realtime('public', 'products')", &[])
        .await
        .unwrap();
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.triggers WHERE event_object_table = 'products'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0, "disable_realtime drops the trigger");
}
