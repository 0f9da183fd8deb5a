//! The service put together: opens the data folder and the database, starts the committer,
//! the email sender and the rule watcher, serves the routes, and on shutdown stops them in order
//! (stop accepting, finish the requests in flight, stop the committer, stop the sender).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};
use tracing::{info, warn};

use crate::actions::jsonl::JsonlFiles;
use crate::actions::{self, Destinations};
use crate::clock::Clock;
use crate::config::{ServeConfig, StoreChoice};
use crate::http::connections::{self, ConnectionLimits};
use crate::http::{self, AppState};
use crate::ingest::event::BodyLimits;
use crate::pipeline::committer::{Committer, Retention};
use crate::pipeline::outbox;
use crate::pipeline::reload::{self, LiveRules};
use crate::pipeline::timers;
use crate::store::Backend;
use crate::store::postgres::Pg;
use crate::store::redb::Db;
use crate::telemetry;

/// How often the committer is woken for the housekeeping time makes due, when no request does.
const TICK_EVERY: Duration = Duration::from_secs(60);

/// Runs the service until `shutdown` completes, then stops in order: stop accepting, finish the
/// requests in flight (their batches commit), stop the committer, stop the sender. `clock` is
/// the time of day everywhere the service reads it (the system's, or one a test moves).
pub async fn serve(
    config: ServeConfig,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.declared.folders.rules.is_dir(),
        "the rules folder {} does not exist (set it with --rules or TRIPLINE_RULES)",
        config.declared.folders.rules.display()
    );
    std::fs::create_dir_all(&config.declared.folders.data).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the data folder {}: {e}",
            config.declared.folders.data.display()
        )
    })?;
    let metrics = telemetry::recorder()?;
    let store: Arc<dyn Backend> = match &config.store {
        StoreChoice::Redb => Arc::new(Db::open(&config.declared.folders.data).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the state database in {}: {e}",
                config.declared.folders.data.display()
            )
        })?),
        StoreChoice::Postgres(url) => Arc::new(
            Pg::open(url, &config.declared.folders.data)
                .map_err(|e| anyhow::anyhow!("cannot use the PostgreSQL store: {e}"))?,
        ),
    };
    let senders = actions::senders(&Destinations::Settings(&config))?;
    let deliveries_queued = Arc::new(Notify::new());
    let days = |n: u64| Duration::from_secs(n.saturating_mul(86_400));
    let retention = Retention {
        // Signed deliveries' ids are kept with event ids: never for less than a signature stays
        // valid, or a captured request could be replayed once its id is forgotten.
        event_ids: days(config.dedupe_retention_days).max(config.limits.signature_tolerance),
        idle_state: days(config.state_idle_days),
    };
    let (committer, committer_thread) = Committer::start(
        store.clone(),
        JsonlFiles::new(&config.declared.folders.data),
        config.email_from.clone(),
        retention,
        config.waits,
        config.limits.max_lines_waiting_bytes as u64,
        deliveries_queued.clone(),
        clock.clone(),
        config.durability,
    )?;
    let (stop_sender, stopped) = watch::channel(false);
    let sender = tokio::spawn(outbox::run_sender(
        store.clone(),
        senders.clone(),
        deliveries_queued.clone(),
        stopped,
        clock.clone(),
    ));

    let live = Arc::new(LiveRules::load(&config.declared, clock.clone()));
    let _watcher = reload::watch(live.clone()).map_err(|e| {
        anyhow::anyhow!(
            "cannot watch {} for changes: {e}",
            config.declared.folders.rules.display()
        )
    })?;
    let ticker = tokio::spawn(tick(committer.clone()));
    let timer = tokio::spawn(timers::run(
        committer.clone(),
        live.clone(),
        clock.clone(),
        config.waits.grace,
        store.is_shared(),
    ));
    let state = AppState {
        clock,
        rules: live,
        committer,
        store,
        metrics,
        sources: config.sources.clone(),
        admin: config.admin.clone(),
        rate_limiter: AppState::rate_limiter(&config.limits),
        body_limits: BodyLimits {
            max_depth: config.limits.max_json_depth,
            max_events: config.limits.max_events_per_body,
            max_clock_skew: Some(config.limits.max_clock_skew),
        },
        max_body_bytes: config.limits.max_body_bytes,
        request_timeout: config.limits.request_timeout,
        unverified: Arc::new(Semaphore::new(config.limits.max_unverified_requests)),
        data_dir: config.declared.folders.data.clone(),
        senders,
        deliveries_queued,
        explained: Arc::default(),
    };
    let connection_limits = ConnectionLimits {
        max_connections: connections::connection_capacity(config.limits.max_connections),
        header_timeout: config.limits.header_timeout,
        shutdown_timeout: config.limits.shutdown_timeout,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    if config.sources.is_empty() {
        if config.accept_unauthenticated {
            warn!(
                "no source is configured and --dangerously-accept-unauthenticated-events is set: \
                 anyone who can reach this port can send events"
            );
        } else {
            info!(
                "no source is configured: events are accepted without a secret, on loopback only"
            );
        }
    } else {
        let names: Vec<&str> = config.sources.names().collect();
        info!(sources = %names.join(", "), "events need a source's bearer token or signature");
    }
    info!("listening on http://{}", listener.local_addr()?);
    let stopping_since = connections::serve(
        listener,
        http::router(state, &config.limits),
        connection_limits,
        shutdown,
    )
    .await;
    // Every connection is closed and the router and the ticker (with their committer handles)
    // are gone, so the committer thread ends once its last batch is committed.
    ticker.abort();
    let _ = ticker.await;
    timer.abort();
    let _ = timer.await;
    // The batches already queued are committed, within the shutdown timeout too: past it the
    // process stops without them (their senders got no answer, and retry).
    let committed = tokio::task::spawn_blocking(move || committer_thread.join());
    let left = config
        .limits
        .shutdown_timeout
        .saturating_sub(stopping_since.elapsed());
    match tokio::time::timeout(left, committed).await {
        Ok(joined) => joined?.map_err(|_| anyhow::anyhow!("the committer thread panicked"))?,
        Err(_) => warn!(
            "the committer still had requests to commit after the shutdown timeout: stopping without them (they were not acknowledged)"
        ),
    }
    let _ = stop_sender.send(true);
    sender.await?;
    info!("stopped");
    Ok(())
}

/// Wakes the committer every [`TICK_EVERY`] (see [`Committer::tick`]).
async fn tick(committer: Committer) {
    let mut every = tokio::time::interval(TICK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = committer.tick().await {
            warn!("housekeeping did not run: {e}");
        }
    }
}
