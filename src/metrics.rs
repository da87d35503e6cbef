//! The process's counters and histograms, rendered by `GET /metrics`.
//!
//! Fan-out is strom's hot path, so what it counts must cost next to nothing:
//! every series here is a fixed array of relaxed atomics, indexed by a
//! small label set known at compile time (a transport, a reason), never by
//! connection. A connection tallies its deliveries itself and adds them to
//! the process's counter every few batches ([`DeliveryTally`]), when it
//! also observes a fan-out latency: never per event.
//!
//! Counters are per process, as Prometheus expects of a process's
//! counters; state (connections, queue depth, history) is read from the
//! engine and the bus at scrape time instead, so it is exact per server.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Every metric of the process.
pub static METRICS: Metrics = Metrics::new();

/// A counter per label value of a label set `N` values wide.
pub struct Family<const N: usize>([AtomicU64; N]);

impl<const N: usize> Family<N> {
    const fn new() -> Self {
        Family([const { AtomicU64::new(0) }; N])
    }

    pub fn add(&self, label: usize, n: u64) {
        self.0[label].fetch_add(n, Relaxed);
    }

    pub fn get(&self, label: usize) -> u64 {
        self.0[label].load(Relaxed)
    }
}

/// Why the server ended a connection that did not ask to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its queue overflowed: it read slower than events arrived.
    Overflow,
    /// A write to its socket made no progress within the write timeout.
    WriteTimeout,
    /// It sent nothing (not even a pong) within the idle timeout.
    Idle,
    /// Its token expired and was not refreshed.
    TokenExpired,
    /// The history its resume needed could not be read.
    History,
}

impl Eviction {
    pub const ALL: [Eviction; 5] = [
        Eviction::Overflow,
        Eviction::WriteTimeout,
        Eviction::Idle,
        Eviction::TokenExpired,
        Eviction::History,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::Overflow => "overflow",
            Eviction::WriteTimeout => "write_timeout",
            Eviction::Idle => "idle",
            Eviction::TokenExpired => "token_expired",
            Eviction::History => "history",
        }
    }
}

/// Why a credential or a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    InvalidToken,
    Expired,
    UnknownApiKey,
    /// No credential where one is needed.
    Unauthenticated,
    /// A valid credential that may not do what it asked.
    Forbidden,
    /// A token sent to a server that verifies none.
    NotConfigured,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 6] = [
        AuthFailure::InvalidToken,
        AuthFailure::Expired,
        AuthFailure::UnknownApiKey,
        AuthFailure::Unauthenticated,
        AuthFailure::Forbidden,
        AuthFailure::NotConfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::Expired => "expired",
            AuthFailure::UnknownApiKey => "unknown_api_key",
            AuthFailure::Unauthenticated => "unauthenticated",
            AuthFailure::Forbidden => "forbidden",
            AuthFailure::NotConfigured => "not_configured",
        }
    }
}

/// A request to NATS that strom counts when it fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsOp {
    /// Creating the consumer that brings a collection's events to the node.
    Watch,
    /// Reading a resuming subscription's history (a direct get, or a
    /// message from the stream leader).
    History,
    /// Asking a stream's state (its oldest and newest seq).
    StreamInfo,
    /// Publishing an event and waiting for JetStream's acknowledgement.
    Publish,
}

impl NatsOp {
    pub const ALL: [NatsOp; 4] = [
        NatsOp::Watch,
        NatsOp::History,
        NatsOp::StreamInfo,
        NatsOp::Publish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NatsOp::Watch => "watch",
            NatsOp::History => "history",
            NatsOp::StreamInfo => "stream_info",
            NatsOp::Publish => "publish",
        }
    }
}

/// One counter per transport, indexed by `Transport as usize`.
pub type PerTransport = Family<{ crate::engine::Transport::ALL.len() }>;

pub struct Metrics {
    /// Events handed to clients, by transport.
    pub deliveries: PerTransport,
    pub connections_opened: PerTransport,
    pub connections_closed: PerTransport,
    pub evictions: Family<{ Eviction::ALL.len() }>,
    pub auth_failures: Family<{ AuthFailure::ALL.len() }>,
    /// NATS requests that failed or timed out, by operation.
    pub nats_request_failures: Family<{ NatsOp::ALL.len() }>,
    /// From a publish request's arrival to the bus's acknowledgement.
    pub publish_duration: Histogram,
    /// From the bus handing an event to this node to a connection's writer
    /// taking it (for the oldest event of every 64th batch a connection
    /// takes).
    pub fanout_latency: Histogram,
}

impl Metrics {
    const fn new() -> Self {
        Metrics {
            deliveries: Family::new(),
            connections_opened: Family::new(),
            connections_closed: Family::new(),
            evictions: Family::new(),
            auth_failures: Family::new(),
            nats_request_failures: Family::new(),
            publish_duration: Histogram::new(),
            fanout_latency: Histogram::new(),
        }
    }

    pub fn evicted(&self, why: Eviction) {
        self.evictions.add(why as usize, 1);
    }

    pub fn auth_failed(&self, why: AuthFailure) {
        self.auth_failures.add(why as usize, 1);
    }
}

/// How often a connection adds its deliveries to the counter and observes a
/// fan-out latency: every this many batches taken (the first included).
const SAMPLE_EVERY: u32 = 64;

/// One connection's deliveries not yet added to [`Metrics::deliveries`].
/// On a busy node a connection takes hundreds of batches a second; a clock
/// read and two atomic additions for each were a measurable share of
/// fan-out, so they happen every [`SAMPLE_EVERY`] batches and at the end.
#[derive(Debug, Default)]
pub struct DeliveryTally {
    unflushed: u64,
    batches: u32,
}

impl DeliveryTally {
    /// Notes a batch taken from the mailbox, whose oldest event the bus
    /// handed over at `oldest`.
    pub fn batch(&mut self, transport: usize, oldest: Instant) {
        if self.batches.is_multiple_of(SAMPLE_EVERY) {
            METRICS.fanout_latency.observe(oldest.elapsed());
            self.flush(transport);
        }
        self.batches = self.batches.wrapping_add(1);
    }

    /// Counts `count` events handed to the client.
    pub fn handed(&mut self, count: usize) {
        self.unflushed += count as u64;
    }

    /// Adds what is tallied to the counter.
    pub fn flush(&mut self, transport: usize) {
        if self.unflushed > 0 {
            METRICS
                .deliveries
                .add(transport, std::mem::take(&mut self.unflushed));
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

/// A latency histogram with fixed buckets (Prometheus' cumulative `le`
/// buckets are summed at render time).
pub struct Histogram {
    /// One more than the bounds: the last counts what exceeds them all.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS_US.len() + 1],
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` series of `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += count.load(Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Writes one series of a counter or gauge family per label value.
pub fn render_family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'static str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// Writes a series without labels.
pub fn render_one(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded_above() {
        let histogram = Histogram::new();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_micros(250));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let mut out = String::new();
        histogram.render(&mut out, "x", "test");
        assert!(out.contains("x_bucket{le=\"0.00025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert!(out.contains("x_sum 60.00335\n"), "{out}");
    }
}
