//! Chaos on a real cluster: three nats-servers with JetStream (the stream
//! kept in three replicas) and two strom processes, with a steady stream of
//! publishes. Each NATS server in turn is killed (SIGKILL) and restarted,
//! then a strom node is killed, while a subscriber drops its stream every
//! few events and resumes on either node. Before each fault the subscriber
//! has caught up, so it resumes while servers are down, while restarted
//! ones catch up, and in between, not only once the publishing is over.
//! Every event must arrive once, in order; the killed node's user must
//! leave presence on the surviving node.

mod common;

use common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use strom::proto;
use strom::proto::realtime_client::RealtimeClient;
use tokio::time::Instant;

const EVENTS: u64 = 240;
/// The subscriber drops its stream after this many events.
const DROP_EVERY: usize = 13;
/// How long any one step may take before the test fails: a publish that
/// keeps failing, or a subscriber that hears nothing.
const STEP_LIMIT: Duration = Duration::from_secs(60);

fn node(nats: &NatsCluster) -> StromProcess {
    StromProcess::start(&[
        "--nats-url",
        &nats.urls,
        "--nats-replicas",
        "3",
        "--nats-timeout",
        "3s",
        "--presence-heartbeat",
        "1s",
        "--presence-timeout",
        "4s",
    ])
}

/// Publishes event `i` through whichever node answers, retrying with the
/// same id (JetStream drops a second copy) until one stores it; its seq.
async fn publish(nodes: &[SocketAddr], i: u64) -> u64 {
    let body = json!({"type": "record.created", "collection": "chaos",
        "record_id": i.to_string(), "id": format!("chaos-{i}"), "data": {"i": i}})
    .to_string();
    let start = Instant::now();
    for attempt in 0.. {
        assert!(start.elapsed() < STEP_LIMIT, "event {i} was never stored");
        let addr = nodes[(i as usize + attempt) % nodes.len()];
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            http(addr, "POST", "/api/v1/publish", &body),
        )
        .await;
        if let Ok(Ok((200, reply))) = answer {
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            return reply["seq"].as_u64().expect("a seq");
        }
    }
    unreachable!()
}

/// What the subscriber saw: every seq in order of arrival, and how often it
/// resumed (in all, and while events were still being published).
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    resumes: usize,
    resumes_while_publishing: usize,
}

/// Subscribes to `chaos` from the start, resuming after every end (an
/// error, a dropped stream, a node gone) on the next node that answers,
/// and drops its own stream every `drop_every` events; tells `progress`
/// the seq of each event; stops once it has an event with seq `last`
/// (which `until` sends when it is known).
async fn subscribe(
    nodes: tokio::sync::watch::Receiver<Vec<SocketAddr>>,
    until: tokio::sync::watch::Receiver<Option<u64>>,
    progress: tokio::sync::watch::Sender<u64>,
    drop_every: usize,
) -> Seen {
    let mut seen = Seen::default();
    let mut since = 0;
    let mut heard = Instant::now();
    'resume: for turn in 0.. {
        // The last event may have come before `until` named it.
        if until.borrow().is_some_and(|last| since >= last) {
            return seen;
        }
        assert!(
            heard.elapsed() < STEP_LIMIT,
            "nothing for {STEP_LIMIT:?} after seq {since}"
        );
        let live = nodes.borrow().clone();
        let addr = live[turn % live.len()];
        let Ok(Ok(mut client)) = tokio::time::timeout(
            Duration::from_secs(5),
            RealtimeClient::connect(format!("http://{addr}")),
        )
        .await
        else {
            continue;
        };
        let request = proto::SubscribeRequest {
            since_seq: Some(since),
            ..text_subscription("chaos", None)
        };
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(5), client.subscribe(request)).await
        else {
            continue;
        };
        let mut stream = stream.into_inner();
        seen.resumes += 1;
        if until.borrow().is_none() {
            seen.resumes_while_publishing += 1;
        }
        let mut this_stream = 0;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
            let Ok(Ok(Some(message))) = message else {
                continue 'resume;
            };
            if let Some(proto::subscribe_response::Kind::Event(event)) = message.kind {
                seen.seqs.push(event.seq);
                since = event.seq;
                progress.send_replace(since);
                heard = Instant::now();
                if until.borrow().is_some_and(|last| since >= last) {
                    return seen;
                }
                this_stream += 1;
                if this_stream == drop_every {
                    continue 'resume;
                }
            }
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_or_repeated_while_nats_servers_and_a_node_fail() {
    let mut nats = NatsCluster::start(3);
    let a = node(&nats);
    let mut b = node(&nats);
    let (live_nodes, nodes) = tokio::sync::watch::channel(vec![a.addr, b.addr]);
    let (last_seq, until) = tokio::sync::watch::channel(None);
    let (progress, mut heard) = tokio::sync::watch::channel(0);
    let subscriber = tokio::spawn(subscribe(nodes, until, progress, DROP_EVERY));
    // A user online on node B only.
    let on_b = WsClient::connect(b.addr, "?user_id=zed")
        .await
        .expect("zed");

    let mut stored = Vec::new();
    let mut interval = tokio::time::interval(Duration::from_millis(20));
    for i in 0..EVENTS {
        interval.tick().await;
        if i % 60 == 30 {
            // A fault comes next: first the subscriber catches up.
            let newest = stored.iter().copied().max().unwrap_or(0);
            let caught_up = heard.wait_for(|&seq| seq >= newest);
            let caught_up = tokio::time::timeout(STEP_LIMIT, caught_up).await;
            assert!(
                matches!(caught_up, Ok(Ok(_))),
                "the subscriber did not reach seq {newest} before event {i}"
            );
        }
        match i {
            30 => nats.kill(0),
            60 => nats.restart(0),
            90 => nats.kill(1),
            120 => nats.restart(1),
            150 => nats.kill(2),
            180 => nats.restart(2),
            210 => {
                b.kill();
                live_nodes.send_replace(vec![a.addr]);
            }
            _ => {}
        }
        let nodes = live_nodes.borrow().clone();
        stored.push(publish(&nodes, i).await);
    }
    last_seq.send_replace(stored.iter().copied().max());
    let seen = subscriber.await.unwrap();

    let mut expected = stored.clone();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(expected.len(), EVENTS as usize, "each event stored once");
    assert_eq!(
        seen.seqs, expected,
        "every event once, in order ({} resumes)",
        seen.resumes
    );
    // Caught up four times, it resumed at least once between faults.
    assert!(
        seen.resumes_while_publishing >= 4,
        "the subscriber resumed during the faults ({} of {} resumes)",
        seen.resumes_while_publishing,
        seen.resumes
    );
    eprintln!(
        "chaos: {EVENTS} events stored, {} received once each in order, {} resumes ({} while publishing), 0 lost, 0 repeated",
        seen.seqs.len(),
        seen.resumes,
        seen.resumes_while_publishing
    );

    // The killed node's user leaves presence on the node that survived.
    drop(on_b);
    within("zed to leave presence", async {
        loop {
            let (status, body) = a.get("/api/v1/presence").await;
            assert_eq!(status, 200, "{body}");
            if !body.contains("zed") {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}
