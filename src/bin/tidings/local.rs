//! The commands that run something here rather than talk to a broker:
//! `serve`, `relay`, `migrate` and `bench`. Every default is the library's.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use tidings::config::{
    self, DEFAULT_BROKER, DEFAULT_DATA_DIR, DEFAULT_LISTEN, DatabaseTimeouts, HumanDuration,
};
use tidings::metrics::Metrics;
use tidings::outbox::{Relay, RelayConfig};
use tidings::server::{self, ClientAuth, ServerConfig, TlsFiles};
use tidings::store::Storage;

use crate::bench::{self, BenchConfig};
use crate::output::Format;
use crate::relay_bench::{self, InboxSide, RelayBenchConfig};
use crate::remote::{open_outbox, tidy};
use crate::{Credentials, duration, interval, shutdown_signal};

/// The server's defaults, which the flags show and fall back to.
fn served() -> ServerConfig {
    ServerConfig::new(DEFAULT_DATA_DIR)
}

/// The relay's defaults.
fn relayed() -> RelayConfig {
    RelayConfig::new(DEFAULT_BROKER)
}

/// The relay's database bounds by default.
fn bounded() -> DatabaseTimeouts {
    DatabaseTimeouts::default()
}

/// The bench's defaults.
fn benched() -> BenchConfig {
    BenchConfig::default()
}

/// Commands that run here.
#[derive(Debug, Subcommand)]
pub(crate) enum Local {
    /// Run the broker.
    Serve(ServeArgs),
    /// Move committed outbox rows from an application's database to the
    /// broker (`--broker`), deleting each after the broker's durable ack.
    Relay(RelayArgs),
    /// Measure throughput and latency. Starts an embedded broker unless
    /// --broker is given; --broker accepts several comma-separated URLs of
    /// instances on one database.
    Bench(BenchArgs),
    /// Apply the broker's PostgreSQL migrations and exit (serve does it too).
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "TIDINGS_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, HOST:PORT (a host name is resolved; use port 0
    /// for any free port).
    #[arg(long, env = "TIDINGS_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: String,
    /// Folder of the embedded SQLite database (the default storage).
    #[arg(long, env = "TIDINGS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Use PostgreSQL at this URL (postgres://...) instead of SQLite; several
    /// instances may share one database. Refused together with an explicit
    /// --data-dir: the storage is one choice.
    #[arg(
        long,
        env = "TIDINGS_DATABASE_URL",
        hide_env_values = true,
        conflicts_with = "data_dir"
    )]
    database_url: Option<String>,
    /// Fsync every commit. `false` survives a broker crash but may lose the
    /// last commits on power loss.
    #[arg(long, env = "TIDINGS_FSYNC", default_value_t = served().store.fsync, action = clap::ArgAction::Set)]
    fsync: bool,
    /// How long published ids are remembered for deduplication.
    #[arg(long, env = "TIDINGS_DEDUP_WINDOW", default_value_t = HumanDuration(served().store.dedup_window), value_parser = duration)]
    dedup_window: HumanDuration,
    /// SQLite: bytes of disk kept in reserve in the data directory (the file
    /// `tidings.reserve`). When the disk fills, the broker gives it up so
    /// that acks, deletions and checkpoints go on, refuses publishes with
    /// RESOURCE_EXHAUSTED and reads NOT_SERVING until space is back; then
    /// it makes the reserve again. 0 keeps no reserve.
    #[arg(long, env = "TIDINGS_DISK_RESERVE", default_value_t = served().store.disk_reserve)]
    disk_reserve: u64,
    /// Most messages' and acks' weight in one group commit.
    #[arg(long, env = "TIDINGS_MAX_COMMIT_BATCH", default_value_t = served().store.max_batch)]
    max_commit_batch: usize,
    /// Largest message, in bytes: payload, ordering key and attributes
    /// together.
    #[arg(long, env = "TIDINGS_MAX_MESSAGE_BYTES", default_value_t = served().limits.max_message_bytes)]
    max_message_bytes: usize,
    /// Most message bytes in one Subscribe or Pull response (a client may
    /// ask for fewer; a single larger message is still delivered, alone).
    #[arg(long, env = "TIDINGS_MAX_RESPONSE_BYTES", default_value_t = served().limits.max_response_bytes)]
    max_response_bytes: usize,
    /// Most messages in one publish request.
    #[arg(long, env = "TIDINGS_MAX_BATCH_MESSAGES", default_value_t = served().limits.max_batch_messages)]
    max_batch_messages: usize,
    /// Largest ordering key, in bytes.
    #[arg(long, env = "TIDINGS_MAX_KEY_BYTES", default_value_t = served().limits.max_key_bytes)]
    max_key_bytes: usize,
    /// Most attributes on one message.
    #[arg(long, env = "TIDINGS_MAX_ATTRIBUTES", default_value_t = served().limits.max_attributes)]
    max_attributes: usize,
    /// Most messages leased to one Subscribe stream at once.
    #[arg(long, env = "TIDINGS_MAX_OUTSTANDING_MESSAGES", default_value_t = served().limits.max_outstanding_messages)]
    max_outstanding_messages: usize,
    /// Largest gRPC request, in bytes.
    #[arg(long, env = "TIDINGS_MAX_REQUEST_BYTES", default_value_t = served().max_request_bytes)]
    max_request_bytes: usize,
    /// Most HTTP/2 streams open at once on one connection.
    #[arg(long, env = "TIDINGS_MAX_CONCURRENT_STREAMS", default_value_t = served().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// Streams a client may reset before its connection is refused (a guard
    /// against rapid-reset floods).
    #[arg(long, env = "TIDINGS_MAX_PENDING_RESET_STREAMS", default_value_t = served().max_pending_reset_streams)]
    max_pending_reset_streams: usize,
    /// HTTP/2 keepalive ping interval.
    #[arg(long, env = "TIDINGS_KEEPALIVE_INTERVAL", default_value_t = HumanDuration(served().keepalive_interval), value_parser = interval)]
    keepalive_interval: HumanDuration,
    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "TIDINGS_KEEPALIVE_TIMEOUT", default_value_t = HumanDuration(served().keepalive_timeout), value_parser = interval)]
    keepalive_timeout: HumanDuration,
    /// How often acked and expired messages are removed and leases swept.
    #[arg(long, env = "TIDINGS_MAINTENANCE_INTERVAL", default_value_t = HumanDuration(served().store.maintenance_interval), value_parser = interval)]
    maintenance_interval: HumanDuration,
    /// How often an idle subscriber stream looks for work it was not woken for.
    #[arg(long, env = "TIDINGS_POLL_INTERVAL", default_value_t = HumanDuration(served().limits.poll_interval), value_parser = interval)]
    poll_interval: HumanDuration,
    /// How long draining waits for clients' calls to finish on shutdown
    /// before closing the remaining connections.
    #[arg(long, env = "TIDINGS_SHUTDOWN_TIMEOUT", default_value_t = HumanDuration(served().drain_timeout), value_parser = duration)]
    shutdown_timeout: HumanDuration,
    /// PostgreSQL: longest a statement may run or wait for a lock.
    #[arg(long, env = "TIDINGS_STATEMENT_TIMEOUT", default_value_t = HumanDuration(served().store.statement_timeout), value_parser = interval)]
    statement_timeout: HumanDuration,
    /// Longest a group commit (or a read) may take before storage counts as
    /// failing: callers get UNAVAILABLE, health turns NOT_SERVING and the
    /// database connection is replaced.
    #[arg(long, env = "TIDINGS_COMMIT_TIMEOUT", default_value_t = HumanDuration(served().store.commit_timeout), value_parser = interval)]
    commit_timeout: HumanDuration,
    /// PostgreSQL: longest a new or pooled database connection may take.
    #[arg(long, env = "TIDINGS_DATABASE_CONNECT_TIMEOUT", default_value_t = HumanDuration(served().store.connect_timeout), value_parser = interval)]
    database_connect_timeout: HumanDuration,
    /// Principals, their credentials (token hashes, certificate names) and
    /// rights: turns access control on (see the README).
    #[arg(long, env = "TIDINGS_ACCESS_FILE")]
    access_file: Option<PathBuf>,
    /// With access control: whether server reflection answers callers
    /// without credentials.
    #[arg(long, env = "TIDINGS_PUBLIC_REFLECTION", default_value_t = served().public_reflection, action = clap::ArgAction::Set)]
    public_reflection: bool,
    /// Serve a non-loopback address without TLS and access control
    /// (refused otherwise): anyone who reaches the port may do anything.
    #[arg(long, env = "TIDINGS_ALLOW_INSECURE")]
    allow_insecure: bool,
    /// With TLS: whether clients must present a certificate signed by
    /// --tls-ca (default: required when --tls-ca is given, else none).
    #[arg(long, env = "TIDINGS_TLS_CLIENT_AUTH", value_enum)]
    tls_client_auth: Option<ClientAuthArg>,
    /// Longest a TLS handshake may take.
    #[arg(long, env = "TIDINGS_TLS_HANDSHAKE_TIMEOUT", default_value_t = HumanDuration(served().network.handshake_timeout), value_parser = interval)]
    tls_handshake_timeout: HumanDuration,
    /// How often the TLS files are checked for a new certificate.
    #[arg(long, env = "TIDINGS_TLS_RELOAD_INTERVAL", default_value_t = HumanDuration(served().network.tls_reload_interval), value_parser = interval)]
    tls_reload_interval: HumanDuration,
    /// Most client connections open at once; more are closed as they
    /// arrive, with a log line (at most every 10 s).
    #[arg(long, env = "TIDINGS_MAX_CONNECTIONS", default_value_t = served().network.max_connections)]
    max_connections: usize,
    /// Close a connection that has had no call in progress for this long
    /// (a socket that never sends a request included).
    #[arg(long, env = "TIDINGS_IDLE_TIMEOUT", default_value_t = HumanDuration(served().network.idle_timeout), value_parser = interval)]
    idle_timeout: HumanDuration,
    /// PostgreSQL: when the connection listening for other instances'
    /// wake-ups heard nothing this long, ping it; unanswered within
    /// --commit-timeout, it is replaced.
    #[arg(long, env = "TIDINGS_LISTEN_CHECK_INTERVAL", default_value_t = HumanDuration(served().store.listen_check_interval), value_parser = interval)]
    listen_check_interval: HumanDuration,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off unless
    /// given; 127.0.0.1:9464, say, keeps them on loopback).
    #[arg(long, env = "TIDINGS_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

/// `--tls-client-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ClientAuthArg {
    /// No client certificate asked for.
    None,
    /// A certificate is checked if the client sends one.
    Optional,
    /// Every client must present one.
    Required,
}

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// The application's database holding `tidings_outbox`
    /// (postgres://... or sqlite://PATH).
    #[arg(long, env = "TIDINGS_OUTBOX_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Most rows per publish request (at most 1000).
    #[arg(long, env = "TIDINGS_RELAY_BATCH_SIZE", default_value_t = relayed().batch_size)]
    batch_size: usize,
    /// Most payload bytes per publish request (at least one row is sent).
    #[arg(long, env = "TIDINGS_RELAY_MAX_BATCH_BYTES", default_value_t = relayed().max_batch_bytes)]
    max_batch_bytes: usize,
    /// Most batches in flight at once (1 to 64): the next batches are sent
    /// while the broker commits earlier ones and their rows are deleted. A
    /// batch never carries a row of a key that has a row in flight.
    #[arg(long, env = "TIDINGS_RELAY_PIPELINE", default_value_t = relayed().pipeline)]
    pipeline: usize,
    /// How often to look for rows without a wake-up; on PostgreSQL also how
    /// often a standby relay tries to take over.
    #[arg(long, env = "TIDINGS_RELAY_POLL_INTERVAL", default_value_t = HumanDuration(relayed().poll_interval), value_parser = interval)]
    poll_interval: HumanDuration,
    /// Wake on the outbox trigger's NOTIFY (PostgreSQL); `false` polls only.
    #[arg(long, env = "TIDINGS_RELAY_LISTEN", default_value_t = relayed().listen, action = clap::ArgAction::Set)]
    listen: bool,
    /// PostgreSQL: when the LISTEN connection heard nothing this long, ping
    /// it; unanswered within --operation-timeout, it is replaced.
    #[arg(long, env = "TIDINGS_RELAY_LISTEN_CHECK_INTERVAL", default_value_t = HumanDuration(relayed().listen_check_interval), value_parser = interval)]
    listen_check_interval: HumanDuration,
    /// First delay before retrying while the broker or the database is
    /// unreachable; doubles up to `--retry-max`.
    #[arg(long, env = "TIDINGS_RELAY_RETRY_MIN", default_value_t = HumanDuration(relayed().retry.min), value_parser = duration)]
    retry_min: HumanDuration,
    /// Longest delay between attempts while the broker or the database is
    /// unreachable.
    #[arg(long, env = "TIDINGS_RELAY_RETRY_MAX", default_value_t = HumanDuration(relayed().retry.max), value_parser = duration)]
    retry_max: HumanDuration,
    /// First delay before retrying a message the broker refused (unknown
    /// topic, over a limit); doubles at each refusal.
    #[arg(long, env = "TIDINGS_RELAY_HOLD_MIN", default_value_t = HumanDuration(relayed().hold_min), value_parser = duration)]
    hold_min: HumanDuration,
    /// Longest delay before retrying a refused message.
    #[arg(long, env = "TIDINGS_RELAY_HOLD_MAX", default_value_t = HumanDuration(relayed().hold_max), value_parser = duration)]
    hold_max: HumanDuration,
    /// How often the relay writes its row in `tidings_outbox_relays`.
    #[arg(long, env = "TIDINGS_RELAY_HEARTBEAT_INTERVAL", default_value_t = HumanDuration(relayed().heartbeat_interval), value_parser = interval)]
    heartbeat_interval: HumanDuration,
    /// PostgreSQL: the leader's lock session may be silent this long before
    /// the server ends it and a standby takes over (a leader whose database
    /// link froze); the leader checks its lock at a third of it.
    #[arg(long, env = "TIDINGS_RELAY_LEADER_TIMEOUT", default_value_t = HumanDuration(relayed().leader_timeout), value_parser = interval)]
    leader_timeout: HumanDuration,
    /// How often the relay logs outbox depth, oldest pending age and last
    /// publish.
    #[arg(long, env = "TIDINGS_RELAY_REPORT_INTERVAL", default_value_t = HumanDuration(relayed().report_interval), value_parser = interval)]
    report_interval: HumanDuration,
    /// Create the outbox tables and triggers if missing.
    #[arg(long, env = "TIDINGS_RELAY_MIGRATE", default_value_t = relayed().migrate, action = clap::ArgAction::Set)]
    migrate: bool,
    /// Create the SQLite database file if it does not exist (without it, a
    /// missing file is refused: a mistyped path would relay nothing, forever).
    #[arg(long, env = "TIDINGS_RELAY_CREATE_IF_MISSING")]
    create_if_missing: bool,
    /// PostgreSQL: longest one of the relay's statements may run or wait for
    /// a lock.
    #[arg(long, env = "TIDINGS_RELAY_STATEMENT_TIMEOUT", default_value_t = HumanDuration(bounded().statement), value_parser = interval)]
    statement_timeout: HumanDuration,
    /// Longest one outbox operation (a fetch, a delete, a heartbeat, the
    /// leader-lock check) may take before it counts as failed and is retried;
    /// on PostgreSQL also how long a session may sit idle in a transaction.
    #[arg(long, env = "TIDINGS_RELAY_OPERATION_TIMEOUT", default_value_t = HumanDuration(bounded().operation), value_parser = interval)]
    operation_timeout: HumanDuration,
    /// PostgreSQL: longest a new or pooled database connection may take.
    #[arg(long, env = "TIDINGS_RELAY_DATABASE_CONNECT_TIMEOUT", default_value_t = HumanDuration(bounded().connect), value_parser = interval)]
    database_connect_timeout: HumanDuration,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off unless
    /// given).
    #[arg(long, env = "TIDINGS_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Publishing tasks.
    #[arg(long, default_value_t = benched().publishers)]
    publishers: usize,
    /// Consuming tasks (on one subscription).
    #[arg(long, default_value_t = benched().subscribers)]
    subscribers: usize,
    /// Messages in all.
    #[arg(long, default_value_t = benched().messages)]
    messages: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = benched().payload_size)]
    payload_size: usize,
    /// Messages per publish request; with `--outbox-url`, per transaction
    /// [default: 100; with both `--outbox-url` and `--inbox-url`, 1].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Requests in flight per publisher.
    #[arg(long, default_value_t = benched().pipeline)]
    pipeline: usize,
    /// Total publish rate, messages per second (default: unlimited).
    #[arg(long)]
    rate: Option<u64>,
    /// Fsync each commit on the embedded broker.
    #[arg(long, default_value_t = benched().fsync, action = clap::ArgAction::Set)]
    fsync: bool,
    /// Print one JSON object (as `--output json` does).
    #[arg(long)]
    json: bool,
    /// Measure the outbox and relay instead: writers commit messages into
    /// the outbox of this database (postgres://... or sqlite://PATH; it must
    /// hold no pending rows), `--publishers` of them, `--batch-size` messages
    /// per transaction, `--rate` transactions per second. Without `--rate`
    /// the outbox is filled first and then drained by a relay (throughput);
    /// with it, each message's commit→broker-ack latency is measured. With
    /// `--inbox-url` too, the whole pipeline: commit, relay, broker, inbox
    /// consumers, all at once, measured from commit to processed.
    #[arg(long)]
    outbox_url: Option<String>,
    /// With `--outbox-url`: wake the relay with NOTIFY (PostgreSQL); `false`
    /// measures polling.
    #[arg(long, default_value_t = relayed().listen, action = clap::ArgAction::Set)]
    relay_listen: bool,
    /// With `--outbox-url`: the relay's poll interval.
    #[arg(long, default_value_t = HumanDuration(relayed().poll_interval), value_parser = interval)]
    relay_poll_interval: HumanDuration,
    /// With `--outbox-url`: rows per relay publish request.
    #[arg(long, default_value_t = relayed().batch_size)]
    relay_batch_size: usize,
    /// With `--outbox-url`: batches the relay keeps in flight.
    #[arg(long, default_value_t = relayed().pipeline)]
    relay_pipeline: usize,
    /// Consume through the inbox of this database (sqlite://PATH or
    /// postgres://...): each subscriber runs the consumer runtime with a
    /// trivial handler.
    #[arg(long, env = "TIDINGS_BENCH_INBOX_URL", hide_env_values = true)]
    inbox_url: Option<String>,
    /// Inbox transactions running at once in each inbox consumer.
    #[arg(long, default_value_t = benched().inbox_concurrency)]
    inbox_concurrency: usize,
    /// Most deliveries in one inbox transaction (group commit).
    #[arg(long, default_value_t = benched().inbox_max_batch)]
    inbox_max_batch: usize,
    /// Deliveries each inbox consumer holds beyond those full batches take.
    #[arg(long, default_value_t = benched().inbox_prefetch)]
    inbox_prefetch: usize,
    /// Run every delivery of an inbox batch in its own savepoint
    /// (`BatchIsolation::Savepoints`) instead of the default optimistic
    /// batches, which take savepoints only after a handler failed.
    #[arg(long)]
    inbox_savepoints: bool,
    /// Ordering keys the published messages cycle through (0: none).
    #[arg(long, default_value_t = benched().keys)]
    keys: usize,
    /// Make the subscription ordered (a key in flight on one stream at a time).
    #[arg(long)]
    ordered: bool,
    /// Most unacked messages each plain subscriber holds.
    #[arg(long, default_value_t = benched().window)]
    window: i32,
    /// Publish every message before the subscribers start, so that they
    /// consume a waiting backlog; the end-to-end figure is then the
    /// consumption rate.
    #[arg(long)]
    backlog: bool,
}

/// Runs a local command; `broker` is the global `--broker`.
pub(crate) async fn run(
    command: Local,
    broker: Option<String>,
    tls: &Credentials,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        Local::Serve(args) => serve(args, tls).await,
        Local::Relay(args) => {
            let broker = broker.unwrap_or_else(|| DEFAULT_BROKER.into());
            relay(args, broker, tls).await
        }
        Local::Bench(mut args) => {
            args.json |= format == Format::Json;
            run_bench(args, broker, tls).await
        }
        Local::Migrate { database_url } => {
            tidings::store::migrate_postgres(&database_url)
                .await
                .map_err(|e| {
                    anyhow!(
                        "cannot migrate {}: {}",
                        tidings::store::redact(&database_url),
                        tidy(&e.to_string())
                    )
                })?;
            match format {
                Format::Text => println!("migrations applied"),
                Format::Json => crate::output::print_json(&serde_json::json!({})),
            }
            Ok(())
        }
    }
}

/// Open files the broker needs besides its client connections: database
/// files and connections, the listener, logs.
const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// Raises the soft limit on open files to the hard limit: each client
/// connection is a file, and the default soft limit (often 1,024) is far
/// below what a broker is expected to hold. Returns the limit now in force.
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (current, maximum) = (limit.current, limit.maximum);
    if current.is_some() && current != maximum {
        let raised = rustix::process::Rlimit {
            current: maximum,
            maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::info!(from = ?current, to = ?maximum, "raised the open file limit");
                return maximum;
            }
            Err(e) => tracing::warn!(error = %e, ?current, "cannot raise the open file limit"),
        }
    }
    current
}

/// The broker's TLS files, if --tls-cert names its certificate.
fn server_tls(args: &ServeArgs, tls: &Credentials) -> anyhow::Result<Option<TlsFiles>> {
    let (cert, key) = match (&tls.tls_cert, &tls.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (None, None) => {
            if tls.tls_ca.is_some() || args.tls_client_auth.is_some() {
                bail!("--tls-ca and --tls-client-auth need TLS: give --tls-cert and --tls-key");
            }
            return Ok(None);
        }
        _ => bail!("TLS needs both the certificate and its key: give --tls-cert and --tls-key"),
    };
    let client_auth = match (args.tls_client_auth, &tls.tls_ca) {
        (Some(ClientAuthArg::None), _) | (None, None) => ClientAuth::None,
        (Some(ClientAuthArg::Optional), _) => ClientAuth::Optional,
        (Some(ClientAuthArg::Required), _) | (None, Some(_)) => ClientAuth::Required,
    };
    Ok(Some(TlsFiles {
        cert,
        key,
        client_ca: tls.tls_ca.clone(),
        client_auth,
    }))
}

async fn serve(args: ServeArgs, tls: &Credentials) -> anyhow::Result<()> {
    let mut config = ServerConfig::new(&args.data_dir);
    if let Some(url) = &args.database_url {
        config.store.storage = Storage::Postgres(url.clone());
    }
    config.store.fsync = args.fsync;
    config.store.dedup_window = args.dedup_window.into();
    config.store.maintenance_interval = args.maintenance_interval.into();
    config.store.max_batch = args.max_commit_batch;
    config.store.disk_reserve = args.disk_reserve;
    config.store.statement_timeout = args.statement_timeout.into();
    config.store.commit_timeout = args.commit_timeout.into();
    config.store.connect_timeout = args.database_connect_timeout.into();
    config.store.listen_check_interval = args.listen_check_interval.into();
    config.limits.max_message_bytes = args.max_message_bytes;
    config.limits.max_response_bytes = args.max_response_bytes;
    config.limits.max_batch_messages = args.max_batch_messages;
    config.limits.max_key_bytes = args.max_key_bytes;
    config.limits.max_attributes = args.max_attributes;
    config.limits.max_outstanding_messages = args.max_outstanding_messages;
    config.limits.poll_interval = args.poll_interval.into();
    config.max_request_bytes = args.max_request_bytes;
    config.max_concurrent_streams = args.max_concurrent_streams;
    config.max_pending_reset_streams = args.max_pending_reset_streams;
    config.keepalive_interval = args.keepalive_interval.into();
    config.keepalive_timeout = args.keepalive_timeout.into();
    config.drain_timeout = args.shutdown_timeout.into();
    config.network.tls = server_tls(&args, tls)?;
    config.network.handshake_timeout = args.tls_handshake_timeout.into();
    config.network.tls_reload_interval = args.tls_reload_interval.into();
    config.network.max_connections = args.max_connections;
    config.network.idle_timeout = args.idle_timeout.into();
    config.access_file = args.access_file.clone();
    config.public_reflection = args.public_reflection;
    config.allow_insecure = args.allow_insecure;
    // Before anything starts: a bad duration is refused here, not by a
    // panicking background task.
    config::check_server_config(&config)?;
    if let Some(files) = raise_open_file_limit()
        && (config.network.max_connections as u64).saturating_add(FILES_BESIDES_CONNECTIONS) > files
    {
        tracing::warn!(
            max_connections = config.network.max_connections,
            open_file_limit = files,
            "--max-connections is above what the open file limit allows: connections past \
             the limit will fail to be accepted; lower --max-connections or raise `ulimit -n`"
        );
    }
    // A host name (localhost:50051) is resolved; the first address that
    // binds is used.
    let listener = tokio::net::TcpListener::bind(args.listen.as_str())
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    match &config.store.storage {
        Storage::Postgres(url) => {
            tracing::info!(database = %tidings::store::redact(url), "starting tidings on PostgreSQL")
        }
        Storage::Sqlite(dir) => {
            tracing::info!(data_dir = %dir.display(), fsync = args.fsync, "starting tidings on SQLite")
        }
    }
    let metrics = start_metrics(args.metrics_listen.as_deref()).await?;
    config.metrics = metrics.as_ref().map(|(m, _)| m.clone());
    let stop = shutdown_signal();
    let storage = match &config.store.storage {
        Storage::Postgres(url) => tidings::store::redact(url),
        Storage::Sqlite(dir) => dir.display().to_string(),
    };
    // Scripts and tests read the bound address from this line, so it is
    // printed only once the storage is open and the broker serves.
    let ready = |addr| println!("tidings listening on {addr}");
    let served = server::run_with_ready(listener, config, stop, ready).await;
    if let Some((_, endpoint)) = metrics {
        endpoint.stop().await;
    }
    served.map_err(|e| {
        anyhow!(
            "cannot run the broker on {storage}: {}",
            tidy(&e.to_string())
        )
    })?;
    Ok(())
}

/// The metrics endpoint's task, stopped when the command ends.
struct Endpoint {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<tidings::Result<()>>,
}

impl Endpoint {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Binds `--metrics-listen` and serves a new registry there. Prints
/// `tidings metrics on ADDR` (scripts and tests read the bound port).
async fn start_metrics(listen: Option<&str>) -> anyhow::Result<Option<(Metrics, Endpoint)>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let listener = tidings::metrics::bind(listen)
        .await
        .context("--metrics-listen")?;
    let addr = listener.local_addr().context("--metrics-listen")?;
    let metrics = Metrics::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(metrics.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    tracing::info!(%addr, "serving metrics at /metrics");
    println!("tidings metrics on {addr}");
    Ok(Some((metrics, Endpoint { stop, task })))
}

async fn relay(args: RelayArgs, broker: String, tls: &Credentials) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let mut config = RelayConfig::new(broker);
    config.connect = tls.connect_options(config.connect.connect_timeout)?;
    config.batch_size = args.batch_size;
    config.max_batch_bytes = args.max_batch_bytes;
    config.pipeline = args.pipeline;
    config.poll_interval = args.poll_interval.into();
    config.listen = args.listen;
    config.listen_check_interval = args.listen_check_interval.into();
    config.retry.min = args.retry_min.into();
    config.retry.max = args.retry_max.into();
    config.hold_min = args.hold_min.into();
    config.hold_max = args.hold_max.into();
    config.heartbeat_interval = args.heartbeat_interval.into();
    config.report_interval = args.report_interval.into();
    config.leader_timeout = args.leader_timeout.into();
    config.migrate = args.migrate;
    config.check()?;
    let timeouts = DatabaseTimeouts {
        statement: args.statement_timeout.into(),
        operation: args.operation_timeout.into(),
        connect: args.database_connect_timeout.into(),
    };
    timeouts.check()?;
    let outbox = open_outbox(&args.database_url, args.create_if_missing, timeouts).await?;
    let metrics = start_metrics(args.metrics_listen.as_deref()).await?;
    let mut relay = Relay::start(outbox.clone(), config).await?;
    if let Some((m, _)) = &metrics {
        m.relay(&relay, outbox);
    }
    // Scripts and tests wait for this line.
    println!("tidings relay started");
    let result = tokio::select! {
        _ = stop => {
            tracing::info!("stopping the relay after the batches in flight");
            relay.stop().await;
            Ok(())
        }
        _ = relay.finished() => Err(anyhow!("the relay task ended unexpectedly")),
    };
    if let Some((_, endpoint)) = metrics {
        endpoint.stop().await;
    }
    result
}

async fn run_bench(
    args: BenchArgs,
    broker: Option<String>,
    credentials: &Credentials,
) -> anyhow::Result<()> {
    let connect = credentials.connect_options(tidings::client::DEFAULT_CONNECT_TIMEOUT)?;
    match args.outbox_url {
        Some(outbox_url) => {
            let inbox = args.inbox_url.map(|url| InboxSide {
                url,
                subscribers: args.subscribers.max(1),
                concurrency: args.inbox_concurrency,
                prefetch: args.inbox_prefetch,
                savepoints: args.inbox_savepoints,
                ordered: args.ordered,
            });
            // The whole pipeline commits one message per transaction unless
            // told otherwise, as an application does.
            let per_commit = args.batch_size.unwrap_or(if inbox.is_some() {
                1
            } else {
                benched().batch_size
            });
            let report = relay_bench::run(RelayBenchConfig {
                broker,
                outbox_url,
                writers: args.publishers,
                messages: args.messages,
                payload_size: args.payload_size,
                per_commit,
                rate: args.rate,
                listen: args.relay_listen,
                poll_interval: args.relay_poll_interval.into(),
                relay_batch: args.relay_batch_size,
                relay_pipeline: args.relay_pipeline,
                fsync: args.fsync,
                keys: args.keys,
                inbox,
            })
            .await?;
            print_report(args.json, &report, report.to_json());
        }
        None => {
            let report = bench::run(BenchConfig {
                broker,
                connect,
                publishers: args.publishers,
                subscribers: args.subscribers,
                messages: args.messages,
                payload_size: args.payload_size,
                batch_size: args.batch_size.unwrap_or(benched().batch_size),
                pipeline: args.pipeline,
                rate: args.rate,
                fsync: args.fsync,
                inbox_url: args.inbox_url,
                inbox_concurrency: args.inbox_concurrency,
                inbox_max_batch: args.inbox_max_batch,
                inbox_prefetch: args.inbox_prefetch,
                inbox_savepoints: args.inbox_savepoints,
                keys: args.keys,
                ordered: args.ordered,
                window: args.window,
                backlog: args.backlog,
            })
            .await?;
            print_report(args.json, &report, report.to_json());
        }
    }
    Ok(())
}

/// Prints a bench report as text, or as one JSON object.
fn print_report(json: bool, report: &impl std::fmt::Display, as_json: String) {
    if json {
        println!("{as_json}");
    } else {
        print!("{report}");
    }
}
