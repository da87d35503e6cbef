//! Matching cost of one event against many subscriptions (`cargo bench`).
//!
//! Shows that subscriptions pinned by equality are found through the index
//! (100k cost about what 1k cost) and what range filters cost. Prints the
//! median of several rounds; timings vary from machine to machine, so the
//! numbers are for comparison within one run.

use serde_json::json;
use std::hint::black_box;
use std::time::{Duration, Instant};
use strom::filter::Filter;
use strom::filter::index::MatchIndex;

/// Median time of one `candidates` + filter evaluation pass.
fn measure(index: &MatchIndex<Filter>, events: &[serde_json::Value]) -> Duration {
    let mut rounds = Vec::new();
    for _ in 0..9 {
        let start = Instant::now();
        let mut matched = 0usize;
        for event in events {
            index.candidates(event, |_, filter| {
                if filter.matches(event) {
                    matched += 1;
                }
            });
        }
        black_box(matched);
        rounds.push(start.elapsed() / events.len() as u32);
    }
    rounds.sort();
    rounds[rounds.len() / 2]
}

fn equality_index(subscriptions: usize) -> MatchIndex<Filter> {
    let mut index = MatchIndex::default();
    for i in 0..subscriptions {
        let filter = Filter::parse(&format!("post_id = \"p{i}\" && visible = true")).unwrap();
        index.insert(i as u64, Some(&filter), filter.clone());
    }
    index
}

fn range_index(subscriptions: usize) -> MatchIndex<Filter> {
    let mut index = MatchIndex::default();
    for i in 0..subscriptions {
        let filter = Filter::parse(&format!("price > {}", i % 1000)).unwrap();
        index.insert(i as u64, Some(&filter), filter.clone());
    }
    index
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a quick smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let events: Vec<_> = (0..if full { 1000 } else { 10 })
        .map(|i| json!({"post_id": format!("p{}", i * 7 % 1000), "visible": true, "price": 10 + i % 50, "title": "x"}))
        .collect();
    println!("one event against N subscriptions (median per event)");
    for n in [1_000, 10_000, 100_000] {
        let index = equality_index(n);
        println!(
            "  equality-pinned  N={n:>7}: {:>8.2?}",
            measure(&index, &events)
        );
    }
    for n in [1_000, 10_000] {
        let index = range_index(n);
        // An event with price 10..60 matches a few percent of these.
        println!(
            "  range (price >)  N={n:>7}: {:>8.2?}",
            measure(&index, &events)
        );
    }
    let mut scan = MatchIndex::default();
    for i in 0..10_000u64 {
        let filter = Filter::parse("price > 5 || visible = false").unwrap();
        scan.insert(i, Some(&filter), filter.clone());
    }
    println!(
        "  unindexed (or)   N=  10000: {:>8.2?}",
        measure(&scan, &events)
    );
}
