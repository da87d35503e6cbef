//! Chaos on a real cluster: three nats-servers with JetStream (the stream
//! kept in three replicas) and two strom processes, with a steady stream of
//! publishes.
//!
//! - Passing faults: each NATS server in turn is killed (SIGKILL) and
//!   restarted, then a strom node is killed, while a subscriber drops its
//!   stream every few events and resumes on either node. Before each fault
//!   the subscriber has caught up, so it resumes while servers are down,
//!   while restarted ones catch up, and in between, not only once the
//!   publishing is over. Every event must arrive once, in order; the
//!   killed node's user must leave presence on the surviving node.
//! - A lasting loss: one server stays down for a minute while a subscriber
//!   drops and resumes at random on both nodes. Once the cluster has
//!   settled, every resume must succeed at its first try (JetStream had
//!   placed a third of new consumers on the dead server, where they never
//!   answered). Then the server comes back, catches up, and holds the
//!   quorum when another one is killed.
//!
//! The two tests take turns: each runs a cluster of its own.

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

/// One cluster at a time: both tests run five servers and two nodes.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _turn = ONE_CLUSTER.lock().await;
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

/// How long one NATS server stays down in the lasting-loss test.
const LASTING_LOSS: Duration = Duration::from_secs(60);
/// Resumes begun this long after the loss must succeed at their first try:
/// the cluster has elected new leaders and the nodes have reconnected.
const SETTLING: Duration = Duration::from_secs(15);
/// Events published every second during the lasting loss.
const LOSS_RATE: u32 = 10;

/// One resume of the random subscriber: when it began, whether it was
/// served (subscribed, then events until the subscriber dropped it), and
/// how long its first event took to come.
struct Attempt {
    began: Instant,
    failure: Option<String>,
    first_event: Option<Duration>,
}

/// A small xorshift generator: the test's random choices, from a seed it
/// prints, so a failing run can be told apart from another.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Resumes `chaos` from the start, on a node picked at random each time,
/// dropping the stream after a random number of events (0 to 20), until it
/// has the seq `until` names; every seq in order of arrival, and every
/// attempt. `newest` is the newest stored seq: silence while it is ahead
/// counts as a failed attempt.
async fn resume_at_random(
    nodes: [SocketAddr; 2],
    mut random: Random,
    newest: tokio::sync::watch::Receiver<u64>,
    until: tokio::sync::watch::Receiver<Option<u64>>,
) -> (Vec<u64>, Vec<Attempt>) {
    let (mut seqs, mut attempts) = (Vec::new(), Vec::<Attempt>::new());
    let mut since = 0;
    let began = Instant::now();
    loop {
        if until.borrow().is_some_and(|last| since >= last) {
            return (seqs, attempts);
        }
        assert!(
            began.elapsed() < 4 * STEP_LIMIT,
            "still resuming after seq {since}"
        );
        let addr = nodes[random.below(2) as usize];
        let drop_after = random.below(21) as usize;
        let mut attempt = Attempt {
            began: Instant::now(),
            failure: None,
            first_event: None,
        };
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            RealtimeClient::connect(format!("http://{addr}")),
        );
        let request = proto::SubscribeRequest {
            since_seq: Some(since),
            ..text_subscription("chaos", None)
        };
        let subscribed = match connected.await {
            Ok(Ok(mut client)) => match client.subscribe(request).await {
                Ok(stream) => Ok(stream.into_inner()),
                Err(status) => Err(format!("subscribe: {status}")),
            },
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err("connect: no answer within 5 s".to_owned()),
        };
        match subscribed {
            Err(failure) => attempt.failure = Some(failure),
            Ok(mut stream) => {
                let mut this_stream = 0;
                while this_stream < drop_after && !until.borrow().is_some_and(|last| since >= last)
                {
                    let message =
                        tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
                    match message {
                        Ok(Ok(Some(message))) => {
                            let Some(proto::subscribe_response::Kind::Event(event)) = message.kind
                            else {
                                continue;
                            };
                            attempt.first_event.get_or_insert(attempt.began.elapsed());
                            seqs.push(event.seq);
                            since = event.seq;
                            this_stream += 1;
                        }
                        Ok(Ok(None)) => {
                            attempt.failure = Some("the stream ended".into());
                            break;
                        }
                        Ok(Err(status)) => {
                            attempt.failure = Some(format!("the stream ended: {status}"));
                            break;
                        }
                        Err(_) if *newest.borrow() > since => {
                            attempt.failure = Some(format!("no event after seq {since} for 5 s"));
                            break;
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        attempts.push(attempt);
    }
}

/// Whether every replica of the cluster's event stream is current.
async fn stream_is_whole(urls: &str) -> bool {
    let Ok(client) = async_nats::connect(urls.split(',').collect::<Vec<_>>()).await else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(2), js.get_stream("STROM_EVENTS")).await
    else {
        return false;
    };
    let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), stream.info()).await else {
        return false;
    };
    let replicas = &info
        .cluster
        .as_ref()
        .map(|c| c.replicas.clone())
        .unwrap_or_default();
    replicas.len() == 2 && replicas.iter().all(|r| r.current && !r.offline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_keep_working_while_one_nats_server_of_three_stays_down() {
    let _turn = ONE_CLUSTER.lock().await;
    let mut nats = NatsCluster::start(3);
    let (a, b) = (node(&nats), node(&nats));
    let nodes = [a.addr, b.addr];
    let mut stored = Vec::new();
    for i in 0..20 {
        stored.push(publish(&nodes, i).await);
    }

    nats.kill(2);
    let lost_at = Instant::now();
    let seed = u64::from(std::process::id()) << 20 | 0x9e37;
    eprintln!("lasting loss: random seed {seed}");
    let (newest_tx, newest) = tokio::sync::watch::channel(0);
    let (last_seq, until) = tokio::sync::watch::channel(None);
    let subscriber = tokio::spawn(resume_at_random(nodes, Random(seed), newest, until));
    let mut interval = tokio::time::interval(Duration::from_secs(1) / LOSS_RATE);
    let mut i = 20;
    while lost_at.elapsed() < LASTING_LOSS {
        interval.tick().await;
        stored.push(publish(&nodes, i).await);
        newest_tx.send_replace(*stored.iter().max().unwrap());
        i += 1;
    }
    let loss_ended = Instant::now();

    // The lost server comes back and catches up while events go on.
    nats.restart(2);
    let caught_up = Instant::now();
    loop {
        assert!(
            caught_up.elapsed() < STEP_LIMIT,
            "the restarted server never caught up"
        );
        interval.tick().await;
        stored.push(publish(&nodes, i).await);
        newest_tx.send_replace(*stored.iter().max().unwrap());
        i += 1;
        if stream_is_whole(&nats.urls).await {
            break;
        }
    }
    last_seq.send_replace(stored.iter().copied().max());
    let (seqs, attempts) = subscriber.await.unwrap();

    let mut expected = stored.clone();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(expected.len(), i as usize, "each event stored once");
    assert_eq!(seqs, expected, "every event once, in order");
    let settled =
        |attempt: &&Attempt| attempt.began >= lost_at + SETTLING && attempt.began < loss_ended;
    let strict: Vec<&Attempt> = attempts.iter().filter(settled).collect();
    let failed: Vec<&String> = strict.iter().filter_map(|a| a.failure.as_ref()).collect();
    assert!(
        strict.len() >= 20,
        "only {} resumes during the loss",
        strict.len()
    );
    assert!(
        failed.is_empty(),
        "resumes failed while one server was down: {failed:?}"
    );
    let slowest = strict
        .iter()
        .filter_map(|a| a.first_event)
        .max()
        .unwrap_or_default();
    eprintln!(
        "lasting loss: {} events once each in order; {} resumes with one server down (after {SETTLING:?}), all served at the first try; slowest first event {slowest:?}; {} resumes in all",
        seqs.len(),
        strict.len(),
        attempts.len()
    );

    // The server that came back holds the quorum with server 1 once server
    // 0 goes: every node still replays the whole history.
    nats.kill(0);
    for addr in nodes {
        let replayed = tokio::time::timeout(STEP_LIMIT, async {
            loop {
                match replay_all(addr, expected.len()).await {
                    Ok(seqs) => return seqs,
                    // A retry's pause while the cluster elects a leader.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let replayed = replayed.await.expect("a replay after the server came back");
        assert_eq!(
            replayed, expected,
            "the replay on {addr} after server 0 went"
        );
    }
}

/// Every retained event of `chaos` through node `addr`, from the start:
/// `count` of them, or an error if the replay did not get that far.
async fn replay_all(addr: SocketAddr, count: usize) -> Result<Vec<u64>, String> {
    let mut client = RealtimeClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?;
    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("chaos", None)
    };
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut seqs = Vec::new();
    while seqs.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
        match message {
            Ok(Ok(Some(message))) => {
                if let Some(proto::subscribe_response::Kind::Event(event)) = message.kind {
                    seqs.push(event.seq);
                }
            }
            Ok(Ok(None)) => return Err("the replay ended".into()),
            Ok(Err(status)) => return Err(status.to_string()),
            Err(_) => return Err("no event for 5 s".into()),
        }
    }
    Ok(seqs)
}
