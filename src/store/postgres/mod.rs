//! The state on PostgreSQL, which several instances share (`--store postgres://...`).
//!
//! The same [`Backend`] and [`Batch`] as the embedded store, so the engine, the committer and
//! the HTTP edge are the same. What sharing asks of it (docs/ARCHITECTURE.md, "Several instances
//! on PostgreSQL"):
//! - One transaction per batch, in a bounded number of round trips: the batch's statements are
//!   pipelined (`pipelined`), its state loaded at once and its writes sent at once with the
//!   commit (`batch.rs`).
//! - Two instances never decide on the same state at once: a batch takes a transaction-scoped
//!   advisory lock on each key and event uuid it loads ([`lock_id`]), in order, before reading
//!   them, so a retry on another instance waits for the first and then finds its uuid handled.
//!   A deadlock between two batches (each loading more keys later) is PostgreSQL's to break: the
//!   loser gets [`StoreError::Conflict`] and the committer runs its batch again.
//! - Deliveries are claimed (`FOR UPDATE SKIP LOCKED`) by one instance at a time, under that
//!   instance's lease: a heartbeat every few seconds keeps it ([`Heartbeat`]); once an instance
//!   stops, its claims lapse and another takes its deliveries over (`claims.rs`).
//! - The schema is versioned, brought up to date at start and refused when newer (`schema.rs`).
//!
//! The client is tokio-postgres, which is async; the traits are not (the committer is a thread
//! of its own). The store runs its connections on a small runtime of its own and waits for each
//! call: callers are the committer's thread and `spawn_blocking` tasks, never an async task.

mod aggregates;
mod batch;
mod claims;
mod schema;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::aggregates::DayData;
use super::queue::{Due, OutboxRecord, OutboxStatus, Skip};
use super::{Backend, Batch, FileProgress, Person, QueuedLines, StoreError};
use batch::PgBatch;

/// How many connections one instance opens at most: one for the committer, the others for the
/// sender, the appender and the endpoints that read.
const POOL_SIZE: usize = 12;

/// How long a call waits for a connection, or for one to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a batch waits for a lock another instance holds before it fails (and is retried
/// by its sender).
const LOCK_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest a transaction may stay open without a statement: a batch decides in
/// milliseconds; one left open by a stalled instance is ended by the server after this.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(60);

/// How long a start waits for the data folder's previous process to let go of its lock: longer
/// than the server takes to find a vanished client's connection dead (keepalives, ~25 s).
const SESSION_WAIT: Duration = Duration::from_secs(30);

/// How many delivery ids an instance takes at a time (one round trip per block).
const ID_BLOCK: i64 = 1000;

/// The store on PostgreSQL. Cheap to share: every call takes a connection from the pool.
pub struct Pg {
    shared: Arc<Shared>,
    /// Keeps the instance's lease while the store is open.
    _heartbeat: Heartbeat,
}

/// What the store and its batches share.
struct Shared {
    pool: Pool,
    /// The runtime the connections run on; taken when the store is dropped (see `Drop`).
    runtime: Option<tokio::runtime::Runtime>,
    /// This instance's name among those sharing the store: its data folder's (see
    /// [`folder_id`]), so that it stays across restarts. It claims deliveries under it, and a
    /// recorded length of an output file says whose copy it is of.
    instance: String,
    /// The delivery ids taken and not yet used: `(next, end)`.
    ids: Mutex<(i64, i64)>,
    /// The connection holding this instance's own lock and those of the output files it
    /// writes ([`session`]); `None` once lost, until the heartbeat makes it again.
    session: Arc<Mutex<Option<Session>>>,
    /// Set when the session was lost and another process has taken this data folder's lock
    /// meanwhile: this one then commits and claims nothing (it would act under the other's
    /// name), and says so at `/readyz`.
    fenced: Arc<std::sync::atomic::AtomicBool>,
    /// The rules this instance runs (see [`Backend::running`]).
    rules: Mutex<Vec<String>>,
    /// When the lease was last renewed.
    last_beat: Arc<Mutex<std::time::Instant>>,
}

/// How to open a connection of the instance's own: the settings and the TLS connector.
type Connect = (
    tokio_postgres::Config,
    tokio_postgres_rustls::MakeRustlsConnect,
);

/// A connection of the instance's own (not the pool's: a session's advisory locks live as long
/// as it), holding the instance's lock (one process per data folder) and those of the files it
/// writes, which are listed.
struct Session {
    client: tokio_postgres::Client,
    files: std::collections::HashSet<String>,
}

/// Opens the instance's session and takes its lock: refused while another process runs with
/// the same data folder (or a copy of it) on this database.
async fn session(
    (config, tls): &Connect,
    instance: &str,
    wait: Duration,
) -> Result<Session, StoreError> {
    let (client, connection) = config.connect(tls.clone()).await.map_err(pg)?;
    tokio::spawn(connection);
    // The process before this one on the same folder (stopped, or killed) may still hold it
    // for a moment: the server ends its session once it sees the connection closed.
    let since = std::time::Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&lock_id("instance", instance)],
            )
            .await
            .map_err(pg)?;
        if row.get::<_, bool>(0) {
            return Ok(Session {
                client,
                files: Default::default(),
            });
        }
        if since.elapsed() >= wait {
            return Err(StoreError::InUse);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Shared {
    /// Dropped from an async task, a runtime cannot wait for its threads: they are let go.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Shared {
    /// Runs `f` on the store's runtime and waits for it. Called from a task of the service's
    /// runtime (a few calls at start-up), the task's thread is handed over for the wait first.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        wait_on(
            (self.runtime.as_ref()).expect("the runtime lives as long as the store"),
            f,
        )
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(unreachable)
    }

    /// An error while another process has this data folder's lock (see `keep_session`).
    fn not_fenced(&self) -> Result<(), StoreError> {
        match self.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            true => Err(StoreError::InUse),
            false => Ok(()),
        }
    }

    /// Whether this instance holds the lock of the output file `file` now.
    fn holds_file(&self, file: &str) -> bool {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        session
            .as_ref()
            .is_some_and(|s| !s.client.is_closed() && s.files.contains(file))
    }

    /// The rules this instance runs, as last told.
    fn rules(&self) -> Vec<String> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Keeps the waits of a rule this instance does not run and another instance alive in the last
/// ten minutes does: theirs to end (a deploy under way). `$A` is this instance, `$R` its rules.
const THEIRS_LEFT: &str = "(rule = ANY($R) OR rule NOT IN (SELECT r.rule FROM instance_rules r \
     JOIN instances i ON i.id = r.instance WHERE r.instance <> $A \
     AND i.alive_until > clock_timestamp() - interval '10 minutes'))";

/// `sql` with [`THEIRS_LEFT`] in place of `THEIRS_LEFT`, its instance and rules as parameters
/// `a` and `r`.
fn leaving_theirs(sql: &str, a: usize, r: usize) -> String {
    let clause = THEIRS_LEFT
        .replace("$A", &format!("${a}"))
        .replace("$R", &format!("${r}::text[]"));
    sql.replace("THEIRS_LEFT", &clause)
}

/// The file in a data folder holding its name among the instances sharing a store.
const FOLDER_ID_FILE: &str = ".tripline-folder-id";

/// The data folder's name among those sharing the store: read from [`FOLDER_ID_FILE`], or
/// made (a random uuid, written atomically) the first time, so that it stays across restarts.
async fn folder_id(data: &Path, client: &deadpool_postgres::Object) -> Result<String, StoreError> {
    let path = data.join(FOLDER_ID_FILE);
    let unusable =
        |e: std::io::Error| StoreError::Unavailable(format!("cannot keep {}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(unusable(e)),
    }
    let row = (client
        .query_one("SELECT gen_random_uuid()::text", &[])
        .await)
        .map_err(pg)?;
    let id: String = row.get(0);
    let temporary = data.join(format!("{FOLDER_ID_FILE}.tmp"));
    std::fs::write(&temporary, format!("{id}\n")).map_err(unusable)?;
    std::fs::rename(&temporary, &path).map_err(unusable)?;
    Ok(id)
}

/// Runs `f` on `runtime` and waits for it (see [`Shared::block_on`]).
fn wait_on<F: Future>(runtime: &tokio::runtime::Runtime, f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| runtime.block_on(f))
        }
        _ => runtime.block_on(f),
    }
}

/// A PostgreSQL error as the store says it: a conflict with another instance (to run the batch
/// again), or the database being unavailable.
fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::UNIQUE_VIOLATION
        {
            return StoreError::Conflict(db.message().to_string());
        }
        return StoreError::Unavailable(format!("PostgreSQL: {}", db.message()));
    }
    StoreError::Unavailable(format!("PostgreSQL: {}", with_causes(&e)))
}

/// Why no connection could be had from the pool, with the server's reason (a database that
/// does not exist, a password refused) or the network's (a connection refused).
fn unreachable(e: deadpool_postgres::PoolError) -> StoreError {
    let why = match &e {
        deadpool_postgres::PoolError::Backend(e) => match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => with_causes(e),
        },
        e => with_causes(e),
    };
    StoreError::Unavailable(format!("cannot reach PostgreSQL: {why}"))
}

/// `e` and what caused it, as one line ("error connecting to server: Connection refused").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Unavailable(format!("an unreadable record in PostgreSQL: {e}"))
}

/// The advisory lock that stands for a key or an event uuid (`kind` tells which): the first
/// 8 bytes of the SHA-256 of both, the same on every instance and version. Two names sharing
/// one only make their batches wait for each other.
pub(super) fn lock_id(kind: &str, name: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(kind.as_bytes());
    hash.update([0]);
    hash.update(name.as_bytes());
    let digest = hash.finalize();
    i64::from_le_bytes(digest[..8].try_into().expect("a digest is 32 bytes"))
}

/// A statement and its parameters, to send later.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// One parameter of [`Params`].
fn boxed<T: ToSql + Sync + Send + 'static>(value: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(value)
}

/// Sends every request of `futures` (made on one connection) before awaiting any answer, in
/// the order given: tokio-postgres sends a request when its future is first polled, so each is
/// polled once in turn before any is polled again. All of them cost one round trip.
async fn pipelined<T>(
    futures: Vec<BoxFuture<'_, Result<T, tokio_postgres::Error>>>,
) -> Result<Vec<T>, StoreError> {
    let mut futures: Vec<Pin<Box<_>>> = futures;
    let mut outputs: Vec<Option<Result<T, tokio_postgres::Error>>> =
        futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none()
                && let Poll::Ready(done) = future.as_mut().poll(cx)
            {
                *output = Some(done);
            }
        }
        match outputs.iter().all(Option::is_some) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    })
    .await;
    // The first error (a later statement of a failed transaction fails too, for its sake).
    outputs
        .into_iter()
        .map(|o| o.expect("every output is set").map_err(pg))
        .collect()
}

/// Makes the instance's session again if it was lost (the server restarted, the network
/// dropped): made outside the lock, so that no caller waits for the network. If another process
/// has taken this data folder's lock meanwhile, the instance is fenced until it can take it back.
async fn keep_session(
    connect: &Connect,
    instance: &str,
    session: &Mutex<Option<Session>>,
    fenced: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let lost = (session.lock().unwrap_or_else(|e| e.into_inner()).as_ref())
        .is_none_or(|s| s.client.is_closed());
    if !lost {
        return;
    }
    match self::session(connect, instance, Duration::ZERO).await {
        Ok(made) => {
            *session.lock().unwrap_or_else(|e| e.into_inner()) = Some(made);
            if fenced.swap(false, Ordering::Relaxed) {
                tracing::info!("this data folder's lock is this instance's again");
            }
        }
        Err(StoreError::InUse) => {
            *session.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if !fenced.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "another process runs with this data folder (or a copy of it) now: this one takes no events and sends nothing until it stops"
                );
            }
        }
        Err(e) => tracing::warn!("cannot take this data folder's lock again yet: {e}"),
    }
}

/// Keeps this instance's lease: every [`HEARTBEAT_EVERY`], its row in `instances` is made
/// alive for [`LEASE`] more (by the database's clock, the same for every instance). Claims of
/// an instance whose lease ran out are anyone's.
struct Heartbeat(tokio::task::JoinHandle<()>);

const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How long an instance's claims outlive its last heartbeat.
const LEASE: Duration = Duration::from_secs(10);
/// How long a heartbeat may take before its connection is given up for a new one.
const BEAT_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Pg {
    /// Connects to `url`, brings the schema up to date (refusing a newer one) and starts this
    /// instance's lease; `data` is the instance's data folder.
    pub fn open(url: &str, data: &Path) -> Result<Pg, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::Unavailable(format!("the PostgreSQL URL cannot be read: {e}"))
        })?;
        if config.get_application_name().is_none() {
            config.application_name("tripline");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // No instance holds up the others for long: a lock waited for longer than
        // LOCK_TIMEOUT fails that batch (503, retried by its sender), a transaction left open
        // by a stalled instance is ended by the server, and a connection to a machine that went
        // away is found dead within seconds by both ends, not TCP's two hours (so its locks,
        // an output file's among them, are freed). Statements are planned at each execution:
        // a plan cached while a table was small (a sequential scan) stays slow once it is not.
        let ours = format!(
            "-c lock_timeout={}ms -c idle_in_transaction_session_timeout={}ms \
             -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
             -c plan_cache_mode=force_custom_plan",
            LOCK_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION.as_millis()
        );
        let options = match config.get_options() {
            Some(theirs) => format!("{ours} {theirs}"),
            None => ours,
        };
        config.options(options);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(Duration::from_secs(20));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = {
            use rustls_platform_verifier::ConfigVerifierExt;
            let config = rustls::ClientConfig::with_platform_verifier().map_err(|e| {
                StoreError::Unavailable(format!("cannot set up TLS for PostgreSQL: {e}"))
            })?;
            tokio_postgres_rustls::MakeRustlsConnect::new(config)
        };
        let connect = (config.clone(), tls.clone());
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot set up PostgreSQL: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tripline-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?;
        let started = wait_on(&runtime, async {
            let mut client = pool.get().await.map_err(unreachable)?;
            schema::migrate(&mut client).await?;
            let instance = folder_id(data, &client).await?;
            let session = session(&connect, &instance, SESSION_WAIT).await?;
            claims::beat(&client, &instance).await?;
            Ok::<_, StoreError>((instance, session))
        });
        let (instance, session) = match started {
            Ok(started) => started,
            Err(e) => {
                // Returned to an async caller: the runtime cannot wait for its threads there.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        // On a connection of its own: a pool busy with batches never delays it.
        let last_beat = Arc::new(Mutex::new(std::time::Instant::now()));
        let session = Arc::new(Mutex::new(Some(session)));
        let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeat = {
            let (connect, instance) = (connect.clone(), instance.clone());
            let (last_beat, session, fenced) = (last_beat.clone(), session.clone(), fenced.clone());
            runtime.spawn(async move {
                let mut every = tokio::time::interval(HEARTBEAT_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut client: Option<tokio_postgres::Client> = None;
                loop {
                    every.tick().await;
                    keep_session(&connect, &instance, &session, &fenced).await;
                    if client
                        .as_ref()
                        .is_none_or(tokio_postgres::Client::is_closed)
                    {
                        client = match connect.0.connect(connect.1.clone()).await {
                            Ok((client, connection)) => {
                                tokio::spawn(connection);
                                Some(client)
                            }
                            Err(e) => {
                                tracing::warn!("cannot renew this instance's lease: {}", pg(e));
                                continue;
                            }
                        };
                    }
                    let Some(live) = &client else { continue };
                    match tokio::time::timeout(BEAT_TIMEOUT, claims::beat(live, &instance)).await {
                        Ok(Ok(())) => {
                            *last_beat.lock().unwrap_or_else(|e| e.into_inner()) =
                                std::time::Instant::now();
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("cannot renew this instance's lease in PostgreSQL: {e}")
                        }
                        Err(_) => {
                            tracing::warn!("renewing this instance's lease took too long: trying a new connection");
                            client = None;
                        }
                    }
                }
            })
        };
        tracing::info!(instance, "the state is kept in PostgreSQL");
        Ok(Pg {
            shared: Arc::new(Shared {
                pool,
                runtime: Some(runtime),
                instance,
                ids: Mutex::new((0, 0)),
                session,
                fenced,
                last_beat,
                rules: Mutex::new(Vec::new()),
            }),
            _heartbeat: Heartbeat(heartbeat),
        })
    }

    /// Runs `f` with a connection, on the store's runtime.
    fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.shared.block_on(async {
            let client = self.shared.client().await?;
            f(&client).await
        })
    }
}

impl Backend for Pg {
    fn begin(&self) -> Result<Box<dyn Batch>, StoreError> {
        self.shared.not_fenced()?;
        let client = self.shared.block_on(self.shared.client())?;
        Ok(Box::new(PgBatch::new(self.shared.clone(), client)))
    }

    fn files(&self) -> Result<Vec<(String, FileProgress)>, StoreError> {
        self.with_client(async |c| {
            let rows = (c.query(
                "SELECT f.file, coalesce(p.len, 0), coalesce(p.applied, 0), f.next, \
                 coalesce(p.writer = $1, true) FROM jsonl_files f LEFT JOIN jsonl_progress p \
                 ON p.file = f.file",
                &[&self.shared.instance],
            ))
            .await
            .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let progress = FileProgress {
                        len: r.get::<_, i64>(1) as u64,
                        applied: r.get::<_, i64>(2) as u64,
                        next: r.get::<_, i64>(3) as u64,
                        ours: r.get(4),
                    };
                    (r.get(0), progress)
                })
                .collect())
        })
    }

    fn queued_lines(
        &self,
        file: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<QueuedLines>, StoreError> {
        self.with_client(async |c| {
            // Read a page at a time until the bytes are enough: most lines are short.
            let sql = "SELECT seq, at_ms, text FROM jsonl_lines WHERE file = $1 AND seq > $2 \
                       ORDER BY seq LIMIT 256";
            let stmt = c.prepare_cached(sql).await.map_err(pg)?;
            let (mut out, mut bytes, mut after) = (Vec::new(), 0, after as i64);
            loop {
                let rows = c.query(&stmt, &[&file, &after]).await.map_err(pg)?;
                for row in &rows {
                    let text: String = row.get(2);
                    if !out.is_empty() && bytes + text.len() > max_bytes {
                        return Ok(out);
                    }
                    bytes += text.len();
                    after = row.get(0);
                    out.push(QueuedLines {
                        seq: after as u64,
                        at_ms: row.get(1),
                        text,
                    });
                }
                if rows.len() < 256 {
                    return Ok(out);
                }
            }
        })
    }

    /// Nothing while the lease has not been renewed for half its length: the others may take
    /// over this instance's deliveries soon, so it starts no attempt they could repeat.
    fn due(&self, now_unix: u64, max: usize, skip: &Skip) -> Result<Due, StoreError> {
        let last_beat = *self
            .shared
            .last_beat
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last_beat.elapsed() > LEASE / 2 || self.shared.not_fenced().is_err() {
            return Ok(Due {
                deliveries: Vec::new(),
                next_due_unix: Some(now_unix + 1),
            });
        }
        self.with_client(async |c| claims::due(c, &self.shared.instance, now_unix, max, skip).await)
    }

    fn pending_count(&self) -> Result<u64, StoreError> {
        self.with_client(async |c| {
            let row = (c.query_one("SELECT count(*) FROM outbox", &[]).await).map_err(pg)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    fn outbox_status(&self, shown: usize) -> Result<OutboxStatus, StoreError> {
        self.with_client(async |c| claims::status(c, shown as i64).await)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.shared.not_fenced()?;
        self.with_client(async |c| c.simple_query("SELECT 1").await.map(drop).map_err(pg))
    }

    /// Every commit is durable when it returns (the server's `synchronous_commit`).
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_client(async |c| {
            let rows = (c.query("SELECT rule, n FROM waiting WHERE n > 0 ORDER BY rule", &[]))
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    /// Of the waits this instance may end (not those it leaves to others).
    fn next_wait_due(&self) -> Result<Option<i64>, StoreError> {
        let sql = leaving_theirs("SELECT min(deadline_ms) FROM waits WHERE THEIRS_LEFT", 1, 2);
        let rules = self.shared.rules();
        self.with_client(async |c| {
            let row = (c.query_one(&sql, &[&self.shared.instance, &rules]).await).map_err(pg)?;
            Ok(row.get(0))
        })
    }

    fn person(&self, who: &str) -> Result<Person, StoreError> {
        self.with_client(async |c| {
            // One snapshot for every part.
            c.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(pg)?;
            let person = batch::person(c, who).await;
            let _ = c.simple_query("COMMIT").await;
            person
        })
    }

    fn aggregates(&self, rule: &str, from: i32, to: i32) -> Result<Vec<DayData>, StoreError> {
        self.with_client(async |c| {
            let rows = (c.query(
                "SELECT rule, day, grp, row_data FROM aggregate_days \
                 WHERE rule = $1 AND day BETWEEN $2 AND $3 ORDER BY day, grp COLLATE \"C\"",
                &[&rule, &from, &to],
            ))
            .await
            .map_err(pg)?;
            let mut days = aggregates::day_data(&rows)?;
            if aggregates::wants_users(&days) {
                let users = (c.query(
                    "SELECT day, grp, hash FROM aggregate_users \
                     WHERE rule = $1 AND day BETWEEN $2 AND $3",
                    &[&rule, &from, &to],
                ))
                .await
                .map_err(pg)?;
                aggregates::add_users(&mut days, &users);
            }
            Ok(days)
        })
    }

    fn aggregate_rules(&self) -> Result<Vec<String>, StoreError> {
        self.with_client(async |c| {
            let rows = (c.query("SELECT rule FROM aggregate_rules ORDER BY rule", &[]))
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    /// The file's lock is a session advisory lock on the instance's session: it is held until
    /// the instance stops, or the session is lost (then another instance may take it, and this
    /// one writes no more until it takes it again).
    fn writes_file(&self, file: &str) -> Result<bool, StoreError> {
        let mut session = (self.shared.session.lock()).unwrap_or_else(|e| e.into_inner());
        if session.as_ref().is_some_and(|s| s.client.is_closed()) {
            tracing::warn!(
                "lost the connection holding the output files' locks: another instance may write them now"
            );
            *session = None;
        }
        // Made again by the heartbeat; until then, this instance writes nothing.
        let Some(held) = session.as_mut() else {
            return Ok(false);
        };
        if held.files.contains(file) {
            return Ok(true);
        }
        self.shared.block_on(async {
            let row = (held.client)
                .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_id("file", file)])
                .await
                .map_err(pg)?;
            let ours: bool = row.get(0);
            if ours {
                tracing::info!(file, "this instance writes the file, into its data folder");
                held.files.insert(file.to_string());
            }
            Ok(ours)
        })
    }

    fn running(&self, rules: &[&str]) -> Result<(), StoreError> {
        let rules: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        self.with_client(async |c| {
            c.simple_query("BEGIN").await.map_err(pg)?;
            let recorded = async {
                let instance = &self.shared.instance;
                c.execute(
                    "DELETE FROM instance_rules WHERE instance = $1",
                    &[instance],
                )
                .await?;
                c.execute(
                    "INSERT INTO instance_rules (instance, rule) \
                     SELECT $1, r FROM unnest($2::text[]) AS r ON CONFLICT DO NOTHING",
                    &[instance, &rules],
                )
                .await?;
                c.simple_query("COMMIT").await
            };
            if let Err(e) = recorded.await {
                let _ = c.simple_query("ROLLBACK").await;
                return Err(pg(e));
            }
            Ok(())
        })?;
        *self.shared.rules.lock().unwrap_or_else(|e| e.into_inner()) = rules;
        Ok(())
    }

    fn explanation(&self, uuid: &str) -> Result<Option<String>, StoreError> {
        self.with_client(async |c| {
            let rows = (c.query(
                "SELECT record FROM explained WHERE uuid = $1 ORDER BY seq",
                &[&uuid],
            ))
            .await
            .map_err(pg)?;
            let records: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            crate::explain::merge_records(&records).map_err(json_err)
        })
    }
}

/// Reads the stored JSON of a pending wait or a delivery.
fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(json_err)
}

/// A delivery record as stored.
fn outbox_record(json: &str) -> Result<OutboxRecord, StoreError> {
    decode(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StateKey, Wants};

    /// A new database on the tests' server (scripts/postgres.sh), or `None` without one.
    fn database() -> Option<String> {
        let server = std::env::var("TRIPLINE_TEST_POSTGRES").ok()?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("unit_{}_{n}", std::process::id());
        let psql = std::env::var("TRIPLINE_TEST_PGBIN").map_or("psql".into(), |b| b + "/psql");
        let made = std::process::Command::new(psql)
            .args([
                &server,
                "-X",
                "-q",
                "-c",
                &format!("CREATE DATABASE {name}"),
            ])
            .status()
            .unwrap();
        assert!(made.success());
        Some(format!("{}/{name}", server.rsplit_once('/').unwrap().0))
    }

    /// Two stores on one new database, as two instances have them (each its data folder),
    /// and the database's URL.
    fn two_instances() -> Option<(Pg, Pg, String, [tempfile::TempDir; 2])> {
        let Some(url) = database() else {
            eprintln!("skipped: no PostgreSQL for the tests (TRIPLINE_TEST_POSTGRES)");
            return None;
        };
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = Pg::open(&url, dirs[0].path()).unwrap();
        let b = Pg::open(&url, dirs[1].path()).unwrap();
        Some((a, b, url, dirs))
    }

    /// How many advisory locks sessions wait for on the database at `url`.
    fn waiting_for_locks(url: &str) -> String {
        let psql = std::env::var("TRIPLINE_TEST_PGBIN").map_or("psql".into(), |b| b + "/psql");
        let sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
        let out = std::process::Command::new(psql)
            .args([url, "-X", "-A", "-t", "-c", sql])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn two_batches_taking_keys_in_opposite_orders_end_in_a_conflict_not_a_hang() {
        let Some((a, b, url, _dirs)) = two_instances() else {
            return;
        };
        let (k1, k2) = (
            StateKey::new("r", "count", &[]),
            StateKey::new("s", "count", &[]),
        );
        let mut first = a.begin().unwrap();
        let mut second = b.begin().unwrap();
        first.load(&Wants::keys(std::slice::from_ref(&k1))).unwrap();
        second
            .load(&Wants::keys(std::slice::from_ref(&k2)))
            .unwrap();
        // Each now wants the other's key: PostgreSQL finds the deadlock and fails one of them,
        // as a conflict the committer runs again; the other goes on and commits.
        let k2_for_first = k2.clone();
        let waiting = std::thread::spawn(move || {
            let loaded = first.load(&Wants::keys(std::slice::from_ref(&k2_for_first)));
            (loaded.map(drop), first)
        });
        while waiting_for_locks(&url) != "1" {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mine = second
            .load(&Wants::keys(std::slice::from_ref(&k1)))
            .map(drop);
        let theirs = match mine {
            // The other failed: this one holds both keys, and commits.
            Ok(()) => {
                second.commit().unwrap();
                waiting.join().unwrap().0
            }
            Err(e) => {
                drop(second);
                let (loaded, first) = waiting.join().unwrap();
                loaded.unwrap();
                first.commit().unwrap();
                Err(e)
            }
        };
        assert!(
            matches!(theirs, Err(StoreError::Conflict(_))),
            "one of them conflicts: {theirs:?}"
        );
    }

    #[test]
    fn a_uuid_handled_by_one_instance_is_a_duplicate_for_another_that_waited_for_it() {
        let Some((a, b, url, _dirs)) = two_instances() else {
            return;
        };
        let uuids = Wants {
            uuids: vec!["0197a3f2-0000-7000-8000-000000000001"],
            ..Wants::default()
        };
        let mut first = a.begin().unwrap();
        let mut state = first.load(&uuids).unwrap();
        assert!(state.first_delivery(uuids.uuids[0]));
        // The same event at another instance now: its load waits for the first's commit...
        let waiting = std::thread::spawn(move || {
            let uuids = Wants {
                uuids: vec!["0197a3f2-0000-7000-8000-000000000001"],
                ..Wants::default()
            };
            let mut second = b.begin().unwrap();
            let mut state = second.load(&uuids).unwrap();
            state.first_delivery(uuids.uuids[0])
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while waiting_for_locks(&url) != "1" {
            assert!(
                std::time::Instant::now() < deadline,
                "the second waits for the first"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!waiting.is_finished());
        first.save(state, 1).unwrap();
        first.commit().unwrap();
        // ... and then finds it handled.
        assert!(!waiting.join().unwrap(), "a duplicate");
    }
}
