//! Connections: accepting them, bounding them in number and time, and closing them on shutdown.
//!
//! axum's `serve` runs hyper without a timer, so a client that opened a connection and sent
//! nothing, or half a header, kept it forever, and enough of them exhausted the open-files limit.
//! Here each connection is served by hyper's HTTP/1 server with a timer:
//! - `header_timeout` bounds how long a connection may take to send a request's headers, counted
//!   from when it is ready for one, so an idle keep-alive connection is closed after it too; and
//!   how long writing an answer may make no progress (a client that stops reading);
//! - the time a request may take once its headers are in is the router's `request_timeout`;
//! - at most `max_connections` are open at once (never more than the open-files limit, which is
//!   raised to its hard limit at start); further clients wait in the kernel's backlog;
//! - on shutdown, listening stops, every connection is asked to finish the request it is on and
//!   close, and those still open after `shutdown_timeout` are cut off, whatever clients do.
//!
//! Only HTTP/1.1 is served: it is what PostHog and webhook senders speak.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutStream;
use tracing::{info, warn};

/// Open files kept free for the rest of the service (the database, output files, templates).
const FILES_KEPT_FREE: u64 = 256;

/// Bounds on connections, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Raises the soft limit on open files to the hard limit (systemd's default soft limit of 1,024
/// is far below what a server holding connections needs), and returns how many connections fit
/// under it: `wanted`, or fewer if the limit is lower.
pub fn connection_capacity(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!("cannot read or raise the open-files limit: {e}");
            return wanted;
        }
    };
    let fits = usize::try_from(limit.saturating_sub(FILES_KEPT_FREE)).unwrap_or(usize::MAX);
    if fits < wanted {
        warn!(
            open_files_limit = limit,
            max_connections = fits.max(1),
            "the open-files limit allows fewer connections than max_connections; raise it (ulimit -n, or LimitNOFILE= in systemd)"
        );
    }
    wanted.min(fits).max(1)
}

/// Serves `router` on `listener` until `shutdown` completes, then closes every connection within
/// `limits.shutdown_timeout`. Returns once no connection is left, with when the stop began (what
/// is left of the shutdown timeout is the caller's).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> Instant {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // wait a little rather than spin, and go on.
                    warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // A client that stops reading its answers (while it pipelines more requests, say) would
        // keep its connection, and the answers waiting for it, for good: a write that makes no
        // progress for `header_timeout` closes the connection.
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.header_timeout));
        let connection = http.serve_connection(
            TokioIo::new(Box::pin(stream)),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            // A client that goes away or times out ends its connection; nothing to report.
            let _ = connection.await;
            drop(slot);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let stopping_since = Instant::now();
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            connections = connections.len(),
            "requests still in flight after the shutdown timeout: closing their connections"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    info!("every connection is closed");
    stopping_since
}
