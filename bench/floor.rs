//! The floors for the HTTP benchmarks: bare axum servers that do less than any webhook engine
//! can. tripline's throughput is quoted as a share of `bare`, measured in the same run
//! (`bench/http.sh`), so the machine's noise cancels out; the other two show how much of that
//! share the least possible work takes away.
//!
//! - `bare`: reads the body of `POST /webhook` and answers 200; no parsing, rules or disk.
//! - `parse`: also parses the body as JSON (a `Value`), as any engine that reads a field must.
//! - `durable`: also appends one short line per request to a file and answers only once it is
//!   synced, with group commit (one thread writes and syncs whatever requests are waiting, then
//!   answers them all): the least a server whose 200 means "on disk" can do. No rules, no
//!   database, no retry deduplication.
//!
//! Run with:
//!
//!     cargo build --release --example floor
//!     target/release/examples/floor 127.0.0.1:9000 [bare|parse|durable FILE]

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use std::io::Write;
use tokio::sync::{mpsc, oneshot};

type Line = (Vec<u8>, oneshot::Sender<()>);

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let mode = args.next().unwrap_or_else(|| "bare".to_string());
    let app = match mode.as_str() {
        "bare" => Router::new().route(
            "/webhook",
            post(|body: Bytes| async move {
                std::hint::black_box(body);
                "{}"
            }),
        ),
        "parse" => Router::new().route("/webhook", post(|body: Bytes| async move { parse(&body) })),
        "durable" => {
            let file = args.next().expect("durable needs an output file");
            let lines = group_commit(std::fs::File::create(file)?);
            Router::new().route(
                "/webhook",
                post(|body: Bytes| async move {
                    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) else {
                        return (StatusCode::BAD_REQUEST, "{}");
                    };
                    let mut line = value["event"]["uuid"].to_string().into_bytes();
                    line.push(b'\n');
                    let (done, written) = oneshot::channel();
                    if lines.send((line, done)).await.is_err() || written.await.is_err() {
                        return (StatusCode::SERVICE_UNAVAILABLE, "{}");
                    }
                    (StatusCode::OK, "{}")
                }),
            )
        }
        other => panic!("unknown floor {other}: bare, parse or durable"),
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "floor ({mode}) listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}

fn parse(body: &[u8]) -> (StatusCode, &'static str) {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            std::hint::black_box(value);
            (StatusCode::OK, "{}")
        }
        Err(_) => (StatusCode::BAD_REQUEST, "{}"),
    }
}

/// A thread that appends whatever lines are waiting, syncs once, then answers them all.
fn group_commit(mut file: std::fs::File) -> mpsc::Sender<Line> {
    let (tx, mut rx) = mpsc::channel::<Line>(1024);
    std::thread::spawn(move || {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let text: Vec<u8> = batch.iter().flat_map(|(line, _)| line.clone()).collect();
            file.write_all(&text)
                .and_then(|()| file.sync_data())
                .expect("cannot write");
            for (_, done) in batch {
                let _ = done.send(());
            }
        }
    });
    tx
}
