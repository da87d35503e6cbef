//! The resume switch (catch-up), driven in-process on the memory bus.

use super::*;
use crate::bus::Retention;
use crate::bus::memory::MemoryBus;
use crate::event::EventType;
use serde_json::json;
use std::time::Duration;

async fn engine(queue_capacity: usize) -> Engine {
    let config = EngineConfig {
        queue_capacity,
        // Fan out event by event, so a small queue overflows only by the
        // reader's pace.
        dispatch_window: Duration::ZERO,
        ..EngineConfig::default()
    };
    Engine::start(config, Auth::open(), |inbox, _| async move {
        Ok(Bus::Memory(MemoryBus::new(inbox, Retention::default())))
    })
    .await
    .unwrap()
}

/// An anonymous WebSocket client's connection.
fn anonymous(engine: &Engine) -> Connection {
    engine
        .connect(Transport::WebSocket, Principal::Anonymous)
        .unwrap()
}

/// Publishes `n` events, alternating `posts` and `other`; returns the seqs
/// of the `posts` ones.
async fn publish(engine: &Engine, n: usize) -> Vec<u64> {
    let mut posts = Vec::new();
    for i in 0..n {
        let collection = if i % 2 == 0 { "posts" } else { "other" };
        let event = Event::new(EventType::RecordCreated, collection, "r", json!({"i": i}));
        let seq = engine
            .publish(&Principal::Anonymous, vec![event])
            .await
            .unwrap()
            .seqs[0];
        if collection == "posts" {
            posts.push(seq);
        }
        tokio::task::yield_now().await;
    }
    posts
}

fn resume(since: u64) -> SubscriptionSpec {
    SubscriptionSpec {
        collection: "posts".into(),
        record_id: None,
        filter: None,
        since: Some(Position::seq(since)),
        echo: false,
    }
}

/// Receives until the event with seq `last`, returning every seq seen.
async fn receive_through(connection: &mut Connection, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let received = tokio::time::timeout(Duration::from_secs(10), connection.recv())
            .await
            .expect("an event")
            .expect("an open connection");
        match received {
            Received::Event(delivery) => seen.push(delivery.event.event.seq),
            Received::Reset(notice) => panic!("unexpected reset {notice:?}"),
        }
    }
    seen
}

#[tokio::test]
async fn a_resumed_subscription_gets_the_history_then_live_with_no_gap_or_repeat() {
    let engine = engine(4096).await;
    let before = publish(&engine, 100).await;
    let mut connection = anonymous(&engine);
    let since = before[9];
    connection.subscribe(resume(since)).await.unwrap();
    let publisher = tokio::spawn({
        let engine = engine.clone();
        async move { publish(&engine, 100).await }
    });
    let after = publisher.await.unwrap();
    let seen = receive_through(&mut connection, *after.last().unwrap()).await;
    let expected: Vec<u64> = before[10..].iter().chain(&after).copied().collect();
    assert_eq!(seen, expected);
}

/// More arrives live during the replay than the queue capacity: the
/// catch-up drops what it held and reads the history on, so the client
/// still gets everything once, in order, and is not cut off.
#[tokio::test]
async fn a_catch_up_outpaced_by_live_events_reads_on_instead_of_overflowing() {
    let engine = engine(16).await;
    let before = publish(&engine, 2000).await;
    let mut connection = anonymous(&engine);
    connection.subscribe(resume(0)).await.unwrap();
    let publisher = tokio::spawn({
        let engine = engine.clone();
        async move { publish(&engine, 400).await }
    });
    let mut seen = Vec::new();
    // Read slower than events arrive until the publisher is done.
    while !publisher.is_finished() {
        match connection.recv().await.expect("not cut off") {
            Received::Event(delivery) => seen.push(delivery.event.event.seq),
            Received::Reset(notice) => panic!("unexpected reset {notice:?}"),
        }
        tokio::task::yield_now().await;
    }
    let after = publisher.await.unwrap();
    let last = *after.last().unwrap();
    if seen.last() != Some(&last) {
        seen.extend(receive_through(&mut connection, last).await);
    }
    let expected: Vec<u64> = before.iter().chain(&after).copied().collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_position_older_than_the_history_gets_a_reset_first() {
    let config = EngineConfig::default();
    let engine = Engine::start(config, Auth::open(), |inbox, _| async move {
        let retention = Retention {
            max_events: 10,
            ..Retention::default()
        };
        Ok(Bus::Memory(MemoryBus::new(inbox, retention)))
    })
    .await
    .unwrap();
    let posts = publish(&engine, 40).await;
    let mut connection = anonymous(&engine);
    let id = connection.subscribe(resume(1)).await.unwrap();
    let Ok(Received::Reset(notice)) = connection.recv().await else {
        panic!("a reset first");
    };
    assert_eq!(
        *notice,
        ResetNotice {
            subscription: id,
            since: Position::seq(1),
            first_available: Position::seq(31)
        }
    );
    let retained: Vec<u64> = posts.into_iter().filter(|seq| *seq >= 31).collect();
    let seen = receive_through(&mut connection, *retained.last().unwrap()).await;
    assert_eq!(seen, retained);
}

/// Unfiltered subscriptions take a dispatch round's events as one run: in
/// order, and without the connection's own events unless it asked for them.
#[tokio::test]
async fn a_run_hands_out_events_in_order_without_own_echoes() {
    let engine = engine(64).await;
    let subscribe = |echo| SubscriptionSpec {
        echo,
        since: None,
        ..resume(0)
    };
    let mut quiet = anonymous(&engine);
    let mut echoing = anonymous(&engine);
    quiet.subscribe(subscribe(false)).await.unwrap();
    echoing.subscribe(subscribe(true)).await.unwrap();
    let post = |i: i32| Event::new(EventType::RecordCreated, "posts", "r", json!({ "i": i }));
    let mut others = Vec::new();
    let mut own = Vec::new();
    for i in 0..3 {
        own.push(quiet.publish(post(i)).await.unwrap());
        let receipt = engine
            .publish(&Principal::Anonymous, vec![post(i), post(i)])
            .await;
        others.extend(receipt.unwrap().seqs);
    }
    let last = *others.last().unwrap();
    assert_eq!(receive_through(&mut quiet, last).await, others);
    let mut all: Vec<u64> = own.iter().chain(&others).copied().collect();
    all.sort();
    assert_eq!(receive_through(&mut echoing, last).await, all);
}

/// An edge may take the rest of a run whole, unless some of it is not for
/// the client; then it goes event by event.
#[tokio::test]
async fn a_run_goes_out_whole_unless_some_of_it_is_not_for_the_client() {
    let engine = engine(64).await;
    let mut connection = anonymous(&engine);
    let spec = SubscriptionSpec {
        since: None,
        ..resume(0)
    };
    let id = connection.subscribe(spec).await.unwrap();
    let post = || Event::new(EventType::RecordCreated, "posts", "r", json!({}));
    let seqs = |slice: &RunSlice| -> Vec<u64> {
        let events = &slice.run.events[slice.range.clone()];
        events.iter().map(|e| e.event.seq).collect()
    };
    // One publish of three: one round, one run.
    let published = engine.publish(&Principal::Anonymous, vec![post(), post(), post()]);
    let published = published.await.unwrap().seqs;
    assert_eq!(
        receive_through(&mut connection, published[0]).await,
        [published[0]]
    );
    let slice = connection.try_recv_run().expect("the rest of the run");
    assert_eq!(
        (slice.subscription, seqs(&slice)),
        (id, published[1..].to_vec())
    );
    assert!(connection.try_recv_run().is_none() && connection.try_recv().is_none());
    assert_eq!(
        connection.resume_position(),
        Some(Position::seq(published[2]))
    );

    // With its own event among them (no echo asked), it goes one by one.
    connection.publish(post()).await.unwrap();
    let others = engine.publish(&Principal::Anonymous, vec![post(), post()]);
    let others = others.await.unwrap().seqs;
    assert_eq!(
        receive_through(&mut connection, others[0]).await,
        [others[0]]
    );
    assert!(connection.try_recv_run().is_none(), "not whole");
    let Some(Received::Event(last)) = connection.try_recv() else {
        panic!("the other event");
    };
    assert_eq!(last.event.event.seq, others[1]);
}

/// Every idle connection's task holds a `recv` future: a large future
/// awaited inline on a rare path (a NATS history read once made it 4.7 KB,
/// 4.5 KiB more per idle connection) makes every connection that much
/// larger.
#[tokio::test]
async fn waiting_for_a_delivery_holds_little_memory() {
    let engine = engine(64).await;
    let mut connection = anonymous(&engine);
    let waiting = std::mem::size_of_val(&connection.recv());
    assert!(
        waiting <= 512,
        "Connection::recv's future is {waiting} bytes"
    );
}
