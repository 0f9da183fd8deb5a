//! The floor for the HTTP benchmarks: a bare axum server that reads the body of `POST /webhook`
//! and answers 200, with no parsing, rules or disk. tripline's throughput is quoted as a share of
//! this one's, measured in the same run (`bench/http.sh`), so the machine's noise cancels out.
//!
//!     cargo build --release --example floor && target/release/examples/floor 127.0.0.1:9000

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let app = Router::new().route(
        "/webhook",
        post(|body: Bytes| async move {
            std::hint::black_box(body);
            "{}"
        }),
    );
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("floor listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
