//! How fast queued `[http]` requests are delivered to a local endpoint that answers 200 at once,
//! against a floor measured in the same run: the same requests sent by a bare reqwest client,
//! with the same number at once and nothing recorded.
//!
//! - `floor`: N POSTs of the same body, `CONCURRENCY` at once, through one reqwest client.
//! - `tripline`: N requests queued in a real store (redb, in a temporary folder), delivered by
//!   the outbox's sender (`pipeline::outbox::deliver_due`) through the `[http]` sender, to an
//!   endpoint with `max_in_flight = CONCURRENCY`: each due delivery read from the store, sent,
//!   and its outcome committed (durably, as the service does), ended attempts recorded together.
//!
//! Both go to the same receiver in this process (an axum server that counts requests and
//! answers 200), on a real socket. Rounds alternate floor and tripline; the medians are printed.
//!
//!     cargo run --release --example deliveries -- [N=20000] [CONCURRENCY=32] [ROUNDS=3]

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::task::JoinSet;
use tripline::actions::http::endpoint::{Endpoint, EndpointConfig, Endpoints};
use tripline::actions::http::send::HttpSender;
use tripline::actions::http::{Method, Request};
use tripline::actions::{Sender, Senders};
use tripline::clock::Clock;
use tripline::pipeline::outbox;
use tripline::store::Backend;
use tripline::store::queue::OutboxRecord;
use tripline::store::redb::Db;

const BODY: &str = r#"{"text":":tada: Big order: 1200 EUR from user_4471 (plan: enterprise)"}"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let concurrency: usize = args.next().map_or(Ok(32), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    // reqwest has no crypto provider of its own here (see Cargo.toml); tripline's sender
    // installs ring, and the floor's client must have one before it is built.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let app = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let counter = counter.clone();
            async move {
                std::hint::black_box(body);
                counter.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut floors = Vec::new();
    let mut ours = Vec::new();
    for round in 1..=rounds {
        let floor = floor(&url, n, concurrency).await?;
        let tripline = tripline(&url, n, concurrency).await?;
        println!("round {round}: floor {floor:.0}/s, tripline {tripline:.0}/s");
        floors.push(floor);
        ours.push(tripline);
    }
    assert_eq!(received.load(Ordering::Relaxed), 2 * n * rounds);
    let (floor, tripline) = (median(&mut floors), median(&mut ours));
    println!(
        "median of {rounds}: floor {floor:.0} requests/s, tripline {tripline:.0} deliveries/s ({:.0}% of the floor), {n} requests, {concurrency} at once",
        100.0 * tripline / floor
    );
    Ok(())
}

/// Requests per second of a bare client.
async fn floor(url: &str, n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder().build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let answer = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(BODY)
                    .send()
                    .await?;
                assert!(answer.status().is_success());
            }
            Ok::<_, reqwest::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Deliveries per second of the outbox's sender, from a store holding `n` due requests.
async fn tripline(url: &str, n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = Arc::new(Db::open(dir.path())?);
    let now = Clock::wall().unix();
    let mut txn = db.begin()?;
    for i in 0..n {
        let request = Request {
            endpoint: "sink".into(),
            method: Method::Post,
            path: vec![],
            content_type: "application/json".into(),
            body: BODY.into(),
            idempotency_key: format!("{i:032x}"),
        };
        txn.queue(&OutboxRecord::new(
            "bench".into(),
            request.into_delivery(),
            now,
        ))?;
    }
    txn.commit()?;
    let config: EndpointConfig =
        serde_json::from_value(json!({"url": url, "max_in_flight": concurrency}))?;
    let mut endpoints = Endpoints::new();
    endpoints.insert(
        "sink".into(),
        Endpoint::load("sink", &config).map_err(anyhow::Error::msg)?,
    );
    let sender: Arc<dyn Sender> = Arc::new(HttpSender::new(Arc::new(endpoints))?);
    let senders = Senders::from_iter([("http", sender)]);
    let started = Instant::now();
    outbox::deliver_due(db.clone(), senders, Clock::wall()).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(db.pending_count()?, 0, "every request delivered");
    Ok(rate)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
