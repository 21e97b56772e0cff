//! The `tidings` command: parses flags (each also a `TIDINGS_*` environment
//! variable) and calls the library.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tidings::bench::{self, BenchConfig};
use tidings::client::{self, Admin, Backoff, Event, FlowControl, Outgoing, Publisher, Subscriber};
use tidings::outbox::bench::RelayBenchConfig;
use tidings::outbox::{Outbox, Relay, RelayConfig};
use tidings::proto;
use tidings::server::{self, ServerConfig};
use tonic::Status;

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Reliable notifications between services"
)]
struct Cli {
    /// Broker URL for client commands [default: http://127.0.0.1:50051].
    /// `bench` starts an embedded broker unless this is given, and accepts
    /// several comma-separated URLs of instances on one database.
    #[arg(long, global = true, env = "TIDINGS_BROKER")]
    broker: Option<String>,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "TIDINGS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Manage topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Manage subscriptions.
    #[command(subcommand)]
    Subscriptions(SubscriptionsCommand),
    /// Show a subscription's stats (same as `subscriptions stats`), an
    /// outbox's (depth, held rows, oldest pending age, relays), or both.
    Stats {
        /// Subscription name.
        #[arg(required_unless_present = "outbox")]
        subscription: Option<String>,
        /// The outbox database URL (postgres://... or sqlite://PATH).
        #[arg(long, env = "TIDINGS_STATS_OUTBOX", hide_env_values = true)]
        outbox: Option<String>,
    },
    /// Move committed outbox rows from an application's database to the
    /// broker (`--broker`), deleting each after the broker's durable ack.
    Relay(RelayArgs),
    /// Publish messages: DATA, or one message per line of standard input.
    Publish(PublishArgs),
    /// Print a subscription's messages and ack them.
    Subscribe(SubscribeArgs),
    /// Check the broker's health; exits non-zero unless SERVING.
    Health {
        /// A service name (default: the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Inspect, redrive and purge dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Measure throughput and latency.
    Bench(BenchArgs),
    /// Apply the broker's PostgreSQL migrations and exit (serve does it too).
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "TIDINGS_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// The application's database holding `tidings_outbox`
    /// (postgres://... or sqlite://PATH).
    #[arg(long, env = "TIDINGS_OUTBOX_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Most rows per publish request (at most 1000).
    #[arg(long, env = "TIDINGS_RELAY_BATCH_SIZE", default_value_t = 500)]
    batch_size: usize,
    /// How often to look for rows without a wake-up; on PostgreSQL also how
    /// often a standby relay tries to take over.
    #[arg(long, env = "TIDINGS_RELAY_POLL_INTERVAL", default_value = "250ms", value_parser = parse_interval)]
    poll_interval: Duration,
    /// Wake on the outbox trigger's NOTIFY (PostgreSQL); `false` polls only.
    #[arg(long, env = "TIDINGS_RELAY_LISTEN", default_value_t = true, action = clap::ArgAction::Set)]
    listen: bool,
    /// Longest delay between attempts while the broker or the database is
    /// unreachable (the first is 100ms, doubling).
    #[arg(long, env = "TIDINGS_RELAY_RETRY_MAX", default_value = "10s", value_parser = parse_duration)]
    retry_max: Duration,
    /// First delay before retrying a message the broker refused (unknown
    /// topic, over a limit); doubles at each refusal.
    #[arg(long, env = "TIDINGS_RELAY_HOLD_MIN", default_value = "1s", value_parser = parse_duration)]
    hold_min: Duration,
    /// Longest delay before retrying a refused message.
    #[arg(long, env = "TIDINGS_RELAY_HOLD_MAX", default_value = "5m", value_parser = parse_duration)]
    hold_max: Duration,
    /// How often the relay writes its row in `tidings_outbox_relays`.
    #[arg(long, env = "TIDINGS_RELAY_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    heartbeat_interval: Duration,
    /// How often the relay logs outbox depth, oldest pending age and last
    /// publish.
    #[arg(long, env = "TIDINGS_RELAY_REPORT_INTERVAL", default_value = "60s", value_parser = parse_interval)]
    report_interval: Duration,
    /// Create the outbox tables and triggers if missing.
    #[arg(long, env = "TIDINGS_RELAY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    migrate: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (use port 0 for any free port).
    #[arg(long, env = "TIDINGS_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Folder of the embedded SQLite database.
    #[arg(long, env = "TIDINGS_DATA_DIR", default_value = "./tidings-data")]
    data_dir: PathBuf,
    /// Use PostgreSQL at this URL (postgres://...) instead of SQLite; several
    /// instances may share one database.
    #[arg(long, env = "TIDINGS_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Fsync every commit. `false` survives a broker crash but may lose the
    /// last commits on power loss.
    #[arg(long, env = "TIDINGS_FSYNC", default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
    /// How long published ids are remembered for deduplication.
    #[arg(long, env = "TIDINGS_DEDUP_WINDOW", default_value = "7d", value_parser = parse_duration)]
    dedup_window: Duration,
    /// Largest message payload, in bytes.
    #[arg(long, env = "TIDINGS_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    max_message_bytes: usize,
    /// Most messages in one publish request.
    #[arg(long, env = "TIDINGS_MAX_BATCH_MESSAGES", default_value_t = 1000)]
    max_batch_messages: usize,
    /// Largest gRPC request, in bytes.
    #[arg(long, env = "TIDINGS_MAX_REQUEST_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_request_bytes: usize,
    /// Most HTTP/2 streams open at once on one connection.
    #[arg(long, env = "TIDINGS_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval.
    #[arg(long, env = "TIDINGS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "TIDINGS_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    keepalive_timeout: Duration,
    /// How often acked and expired messages are removed and leases swept.
    #[arg(long, env = "TIDINGS_MAINTENANCE_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    maintenance_interval: Duration,
    /// How often an idle subscriber stream looks for work it was not woken for.
    #[arg(long, env = "TIDINGS_POLL_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    poll_interval: Duration,
    /// How long draining waits for clients' calls to finish on shutdown
    /// before closing the remaining connections.
    #[arg(long, env = "TIDINGS_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create a topic.
    Create {
        /// Name.
        name: String,
        /// Keep acked messages this long for replay.
        #[arg(long, value_parser = parse_duration)]
        retention: Option<Duration>,
        /// Expire messages older than this, acked or not.
        #[arg(long, value_parser = parse_duration)]
        max_age: Option<Duration>,
    },
    /// List topics.
    List,
    /// Show a topic.
    Get {
        /// Name.
        name: String,
    },
    /// Delete a topic (it must have no subscriptions).
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SubscriptionsCommand {
    /// Create a subscription.
    Create(CreateSubscriptionArgs),
    /// List subscriptions.
    List {
        /// Only those of this topic.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Show a subscription.
    Get {
        /// Name.
        name: String,
    },
    /// Delete a subscription and its state.
    Delete {
        /// Name.
        name: String,
    },
    /// Show a subscription's stats.
    Stats {
        /// Name.
        name: String,
    },
    /// Move a subscription's cursor to a sequence number.
    Seek {
        /// Name.
        name: String,
        /// First sequence number to deliver.
        #[arg(long)]
        sequence: i64,
    },
}

#[derive(Debug, Args)]
struct CreateSubscriptionArgs {
    /// Name.
    name: String,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Lease length.
    #[arg(long, value_parser = parse_duration)]
    ack_deadline: Option<Duration>,
    /// Deliveries before dead-lettering.
    #[arg(long)]
    max_attempts: Option<i32>,
    /// First backoff.
    #[arg(long, value_parser = parse_duration)]
    min_backoff: Option<Duration>,
    /// Longest backoff.
    #[arg(long, value_parser = parse_duration)]
    max_backoff: Option<Duration>,
    /// Topic that receives a copy of each dead letter.
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// One message per ordering key at a time, in order.
    #[arg(long)]
    ordered: bool,
    /// Where to start: earliest, latest, or a Unix time in seconds.
    #[arg(long, default_value = "latest")]
    start: String,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Ordering key.
    #[arg(long)]
    key: Option<String>,
    /// Message id (UUID); only with DATA. Default: a fresh UUID v7.
    #[arg(long)]
    id: Option<uuid::Uuid>,
    /// Payload; without it, each line of standard input is one message.
    data: Option<String>,
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    /// Subscription name.
    subscription: String,
    /// Print without acking (messages come back after their lease).
    #[arg(long)]
    no_ack: bool,
    /// Exit after this many messages.
    #[arg(long)]
    max: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// List dead letters.
    List {
        /// Subscription.
        subscription: String,
    },
    /// Make dead letters deliverable again.
    Redrive {
        /// Subscription.
        subscription: String,
        /// Only these sequence numbers (default: all).
        #[arg(long = "sequence")]
        sequences: Vec<i64>,
    },
    /// Delete dead letters for good.
    Purge {
        /// Subscription.
        subscription: String,
        /// These sequence numbers.
        #[arg(long = "sequence")]
        sequences: Vec<i64>,
        /// All of them.
        #[arg(long)]
        all: bool,
    },
}

/// The broker client commands talk to unless told otherwise.
const DEFAULT_BROKER: &str = "http://127.0.0.1:50051";

#[derive(Debug, Args)]
struct BenchArgs {
    /// Publishing tasks.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Consuming tasks (on one subscription).
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    payload_size: usize,
    /// Messages per publish request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Requests in flight per publisher.
    #[arg(long, default_value_t = 8)]
    pipeline: usize,
    /// Total publish rate, messages per second (default: unlimited).
    #[arg(long)]
    rate: Option<u64>,
    /// Fsync each commit on the embedded broker.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Measure the outbox and relay instead: writers commit messages into
    /// the outbox of this database (postgres://... or sqlite://PATH; it must
    /// hold no pending rows), `--publishers` of them, `--batch-size` messages
    /// per transaction, `--rate` transactions per second. Without `--rate`
    /// the outbox is filled first and then drained by a relay (throughput);
    /// with it, each message's commit→broker-ack latency is measured.
    #[arg(long)]
    outbox_url: Option<String>,
    /// With `--outbox-url`: wake the relay with NOTIFY (PostgreSQL); `false`
    /// measures polling.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    relay_listen: bool,
    /// With `--outbox-url`: the relay's poll interval.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    relay_poll_interval: Duration,
    /// With `--outbox-url`: rows per relay publish request.
    #[arg(long, default_value_t = 500)]
    relay_batch_size: usize,
    /// Consume through the inbox of this database (sqlite://PATH or
    /// postgres://...): each subscriber runs the consumer runtime with a
    /// trivial handler.
    #[arg(long, env = "TIDINGS_BENCH_INBOX_URL", hide_env_values = true)]
    inbox_url: Option<String>,
    /// Handlers running at once in each inbox consumer.
    #[arg(long, default_value_t = 8)]
    inbox_concurrency: usize,
    /// Deliveries each inbox consumer holds beyond those being handled.
    #[arg(long, default_value_t = 8)]
    inbox_prefetch: usize,
    /// Ordering keys the published messages cycle through (0: none).
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// Make the subscription ordered (one message in flight per key).
    #[arg(long)]
    ordered: bool,
    /// Most unacked messages each plain subscriber holds.
    #[arg(long, default_value_t = 2000)]
    window: i32,
}

/// Parses a duration flag with the library's one parser.
fn parse_duration(s: &str) -> Result<Duration, tidings::Error> {
    tidings::config::parse_duration(s)
}

/// Parses a flag that sets how often something repeats (zero refused).
fn parse_interval(s: &str) -> Result<Duration, tidings::Error> {
    tidings::config::parse_interval(s)
}

fn show_duration(d: Option<&prost_types::Duration>) -> String {
    d.map(|d| {
        format!(
            "{:?}",
            Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
        )
    })
    .unwrap_or_else(|| "-".into())
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Turns a gRPC status into an error that names the code and the message.
fn grpc(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Relay(_)) {
        "info"
    } else {
        "warn"
    };
    init_logs(cli.log_format, default_level);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is
/// called, not when it is first polled, so a signal that arrives while the
/// broker is still opening its storage drains it instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch signals; only Ctrl-C stops the broker");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate { database_url } => {
            tidings::store::migrate_postgres(&database_url).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Bench(args) if args.outbox_url.is_some() => {
            let report = tidings::outbox::bench::run(RelayBenchConfig {
                broker: cli.broker,
                outbox_url: args.outbox_url.unwrap_or_default(),
                writers: args.publishers,
                messages: args.messages,
                payload_size: args.payload_size,
                per_commit: args.batch_size,
                rate: args.rate,
                listen: args.relay_listen,
                poll_interval: args.relay_poll_interval,
                relay_batch: args.relay_batch_size,
                fsync: args.fsync,
            })
            .await?;
            print_report(args.json, &report, report.to_json());
            Ok(())
        }
        Command::Bench(args) => {
            let report = bench::run(BenchConfig {
                broker: cli.broker,
                publishers: args.publishers,
                subscribers: args.subscribers,
                messages: args.messages,
                payload_size: args.payload_size,
                batch_size: args.batch_size,
                pipeline: args.pipeline,
                rate: args.rate,
                fsync: args.fsync,
                inbox_url: args.inbox_url,
                inbox_concurrency: args.inbox_concurrency,
                inbox_prefetch: args.inbox_prefetch,
                keys: args.keys,
                ordered: args.ordered,
                window: args.window,
            })
            .await?;
            print_report(args.json, &report, report.to_json());
            Ok(())
        }
        Command::Relay(args) => {
            relay(
                args,
                cli.broker.unwrap_or_else(|| DEFAULT_BROKER.to_owned()),
            )
            .await
        }
        Command::Stats {
            subscription: None,
            outbox: Some(url),
        } => outbox_stats(&url).await,
        Command::Stats {
            subscription: Some(name),
            outbox: Some(url),
        } => {
            outbox_stats(&url).await?;
            println!();
            let url = cli.broker.as_deref().unwrap_or(DEFAULT_BROKER);
            let channel = client::channel(url).map_err(grpc)?;
            run_client(
                Command::Stats {
                    subscription: Some(name),
                    outbox: None,
                },
                channel,
            )
            .await
        }
        command => {
            let url = cli.broker.as_deref().unwrap_or(DEFAULT_BROKER);
            let channel = client::channel(url).map_err(grpc)?;
            run_client(command, channel).await
        }
    }
}

/// Prints a bench report as text, or as one JSON object.
fn print_report(json: bool, report: &impl std::fmt::Display, as_json: String) {
    if json {
        println!("{as_json}");
    } else {
        print!("{report}");
    }
}

async fn relay(args: RelayArgs, broker: String) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let outbox = Outbox::connect(&args.database_url).await?;
    let mut config = RelayConfig::new(broker);
    config.batch_size = args.batch_size;
    config.poll_interval = args.poll_interval;
    config.listen = args.listen;
    config.retry.max = args.retry_max;
    config.hold_min = args.hold_min;
    config.hold_max = args.hold_max;
    config.heartbeat_interval = args.heartbeat_interval;
    config.report_interval = args.report_interval;
    config.migrate = args.migrate;
    let mut relay = Relay::start(outbox, config).await?;
    // Scripts and tests wait for this line.
    println!("tidings relay started");
    tokio::select! {
        _ = stop => {
            tracing::info!("stopping the relay after the batch in flight");
            relay.stop().await;
            Ok(())
        }
        _ = relay.finished() => bail!("the relay task ended unexpectedly"),
    }
}

async fn outbox_stats(url: &str) -> anyhow::Result<()> {
    let s = Outbox::connect(url).await?.stats().await?;
    let ago = |t: std::time::SystemTime| {
        t.elapsed()
            .map(|d| format!("{:.1}s ago", d.as_secs_f64()))
            .unwrap_or_else(|_| "just now".into())
    };
    println!(
        "outbox_depth: {}\nheld: {}\noldest_pending_age: {}\nheld_error: {}",
        s.depth,
        s.held,
        s.oldest_age
            .map(|d| format!("{:.3}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into()),
        s.held_error.as_deref().unwrap_or("-"),
    );
    for r in &s.relays {
        println!(
            "relay: {} leader={} published={} last_publish={} heartbeat={} last_error={}",
            r.relay,
            r.leader,
            r.published,
            r.last_publish.map(ago).unwrap_or_else(|| "never".into()),
            ago(r.heartbeat),
            r.last_error.as_deref().unwrap_or("-"),
        );
    }
    if s.relays.is_empty() {
        println!("relay: none reported");
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = ServerConfig::new(&args.data_dir);
    config.store.fsync = args.fsync;
    config.store.database_url = args.database_url;
    config.store.dedup_window = args.dedup_window;
    config.store.maintenance_interval = args.maintenance_interval;
    config.limits.max_message_bytes = args.max_message_bytes;
    config.limits.max_batch_messages = args.max_batch_messages;
    config.limits.poll_interval = args.poll_interval;
    config.max_request_bytes = args.max_request_bytes;
    config.max_concurrent_streams = args.max_concurrent_streams;
    config.keepalive_interval = args.keepalive_interval;
    config.keepalive_timeout = args.keepalive_timeout;
    config.drain_timeout = args.shutdown_timeout;
    // Before anything starts: a bad duration is refused here, not by a
    // panicking background task.
    tidings::config::check_server_config(&config)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    match &config.store.database_url {
        Some(url) => {
            tracing::info!(database = %tidings::store::redact(url), "starting tidings on PostgreSQL")
        }
        None => {
            tracing::info!(data_dir = %args.data_dir.display(), fsync = args.fsync, "starting tidings on SQLite")
        }
    }
    let stop = shutdown_signal();
    // Scripts and tests read the bound address from this line.
    println!("tidings listening on {addr}");
    server::run(listener, config, stop).await?;
    Ok(())
}

async fn run_client(command: Command, channel: tonic::transport::Channel) -> anyhow::Result<()> {
    let admin = Admin::new(channel.clone());
    let mut raw = admin.raw();
    match command {
        Command::Topics(TopicsCommand::Create {
            name,
            retention,
            max_age,
        }) => {
            let topic = proto::Topic {
                name,
                retention: retention.map(proto::duration),
                max_age: max_age.map(proto::duration),
                ..Default::default()
            };
            let t = raw
                .create_topic(proto::CreateTopicRequest { topic: Some(topic) })
                .await
                .map_err(grpc)?
                .into_inner();
            println!(
                "created topic {}",
                t.topic.map(|t| t.name).unwrap_or_default()
            );
        }
        Command::Topics(TopicsCommand::List) => {
            let mut token = String::new();
            loop {
                let page = raw
                    .list_topics(proto::ListTopicsRequest {
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                for t in page.topics {
                    println!("{}\tlast_sequence={}", t.name, t.last_sequence);
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Command::Topics(TopicsCommand::Get { name }) => {
            let t = raw
                .get_topic(proto::GetTopicRequest { name })
                .await
                .map_err(grpc)?
                .into_inner()
                .topic
                .unwrap_or_default();
            println!(
                "name: {}\nlast_sequence: {}\nretention: {}\nmax_age: {}\nexpired: {}",
                t.name,
                t.last_sequence,
                show_duration(t.retention.as_ref()),
                show_duration(t.max_age.as_ref()),
                t.expired_count
            );
        }
        Command::Topics(TopicsCommand::Delete { name }) => {
            raw.delete_topic(proto::DeleteTopicRequest { name: name.clone() })
                .await
                .map_err(grpc)?;
            println!("deleted topic {name}");
        }
        Command::Subscriptions(SubscriptionsCommand::Create(a)) => {
            let start = match a.start.as_str() {
                "earliest" => {
                    proto::subscription::Start::StartPosition(proto::StartPosition::Earliest as i32)
                }
                "latest" => {
                    proto::subscription::Start::StartPosition(proto::StartPosition::Latest as i32)
                }
                secs => {
                    let secs: i64 = secs.parse().with_context(|| {
                        format!("--start {secs:?}: use earliest, latest or a Unix time in seconds")
                    })?;
                    proto::subscription::Start::StartTime(prost_types::Timestamp {
                        seconds: secs,
                        nanos: 0,
                    })
                }
            };
            let sub = proto::Subscription {
                name: a.name,
                topic: a.topic,
                ack_deadline: a.ack_deadline.map(proto::duration),
                max_attempts: a.max_attempts.unwrap_or(0),
                min_backoff: a.min_backoff.map(proto::duration),
                max_backoff: a.max_backoff.map(proto::duration),
                dead_letter_topic: a.dead_letter_topic.unwrap_or_default(),
                ordered: a.ordered,
                start: Some(start),
                ..Default::default()
            };
            let s = admin.create_subscription(sub).await.map_err(grpc)?;
            println!("created subscription {} on topic {}", s.name, s.topic);
        }
        Command::Subscriptions(SubscriptionsCommand::List { topic }) => {
            let mut token = String::new();
            loop {
                let page = raw
                    .list_subscriptions(proto::ListSubscriptionsRequest {
                        topic: topic.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                for s in page.subscriptions {
                    println!("{}\ttopic={}\tordered={}", s.name, s.topic, s.ordered);
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Command::Subscriptions(SubscriptionsCommand::Get { name }) => {
            let s = raw
                .get_subscription(proto::GetSubscriptionRequest { name })
                .await
                .map_err(grpc)?
                .into_inner()
                .subscription
                .unwrap_or_default();
            println!(
                "name: {}\ntopic: {}\nack_deadline: {}\nmax_attempts: {}\nmin_backoff: {}\nmax_backoff: {}\ndead_letter_topic: {}\nordered: {}",
                s.name,
                s.topic,
                show_duration(s.ack_deadline.as_ref()),
                s.max_attempts,
                show_duration(s.min_backoff.as_ref()),
                show_duration(s.max_backoff.as_ref()),
                s.dead_letter_topic,
                s.ordered
            );
        }
        Command::Subscriptions(SubscriptionsCommand::Delete { name }) => {
            raw.delete_subscription(proto::DeleteSubscriptionRequest { name: name.clone() })
                .await
                .map_err(grpc)?;
            println!("deleted subscription {name}");
        }
        Command::Subscriptions(SubscriptionsCommand::Stats { name })
        | Command::Stats {
            subscription: Some(name),
            ..
        } => {
            let s = admin.stats(&name).await.map_err(grpc)?;
            println!(
                "subscription: {}\nbacklog: {}\nin_flight: {}\noldest_unacked_age: {}\ndead_lettered: {}\ndelivered: {}\nacked: {}\nredelivered: {}\nblocked_keys: {} {:?}\nack_watermark: {}",
                s.subscription,
                s.backlog,
                s.in_flight,
                show_duration(s.oldest_unacked_age.as_ref()),
                s.dead_lettered,
                s.delivered,
                s.acked,
                s.redelivered,
                s.blocked_keys,
                s.blocked_key_sample,
                s.ack_watermark
            );
        }
        Command::Subscriptions(SubscriptionsCommand::Seek { name, sequence }) => {
            let r = raw
                .seek(proto::SeekRequest {
                    subscription: name.clone(),
                    target: Some(proto::seek_request::Target::Sequence(sequence)),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            println!("{name} delivers from sequence {} on", r.next_sequence);
        }
        Command::Publish(a) => publish(a, channel).await?,
        Command::Subscribe(a) => subscribe(a, channel).await?,
        Command::Health { service } => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let r = health
                .check(tonic_health::pb::HealthCheckRequest { service })
                .await
                .map_err(grpc)?
                .into_inner();
            let status = tonic_health::pb::health_check_response::ServingStatus::try_from(r.status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            println!("{status}");
            if status != "SERVING" {
                bail!("broker is {status}");
            }
        }
        Command::DeadLetters(DeadLettersCommand::List { subscription }) => {
            let mut token = String::new();
            loop {
                let page = raw
                    .list_dead_letters(proto::ListDeadLettersRequest {
                        subscription: subscription.clone(),
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                for d in page.dead_letters {
                    let m = d.message.unwrap_or_default();
                    println!(
                        "seq={}\tid={}\tattempts={}\treason={:?}\tpayload={}",
                        m.sequence,
                        m.id,
                        d.attempts,
                        d.last_failure_reason,
                        String::from_utf8_lossy(&m.payload)
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Command::DeadLetters(DeadLettersCommand::Redrive {
            subscription,
            sequences,
        }) => {
            let r = raw
                .redrive_dead_letters(proto::RedriveDeadLettersRequest {
                    subscription,
                    sequences,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            println!("redriven: {}", r.redriven_count);
        }
        Command::DeadLetters(DeadLettersCommand::Purge {
            subscription,
            sequences,
            all,
        }) => {
            let r = raw
                .purge_dead_letters(proto::PurgeDeadLettersRequest {
                    subscription,
                    sequences,
                    all,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            println!("purged: {}", r.purged_count);
        }
        Command::Serve(_)
        | Command::Bench(_)
        | Command::Migrate { .. }
        | Command::Relay(_)
        | Command::Stats {
            subscription: None, ..
        } => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

async fn publish(a: PublishArgs, channel: tonic::transport::Channel) -> anyhow::Result<()> {
    let publisher = Publisher::new(channel, Backoff::default());
    let make = |data: Vec<u8>| {
        let mut m = Outgoing::new(a.topic.clone(), data);
        m.key = a.key.clone();
        m
    };
    if let Some(data) = &a.data {
        let mut m = make(data.clone().into_bytes());
        if let Some(id) = a.id {
            m.id = id;
        }
        let r = publisher.publish(&[m]).await.map_err(grpc)?;
        for r in r {
            println!(
                "{}\tsequence={}{}",
                r.id,
                r.sequence,
                if r.duplicate { "\tduplicate" } else { "" }
            );
        }
        return Ok(());
    }
    if a.id.is_some() {
        bail!("--id needs DATA: lines from standard input each get a fresh id");
    }
    let stdin = std::io::stdin();
    let mut batch = Vec::new();
    let mut lines = stdin.lock().lines();
    loop {
        let line = lines.next().transpose().context("reading standard input")?;
        let done = line.is_none();
        if let Some(line) = line {
            batch.push(make(line.into_bytes()));
        }
        if batch.len() >= 500 || (done && !batch.is_empty()) {
            for r in publisher.publish(&batch).await.map_err(grpc)? {
                println!(
                    "{}\tsequence={}{}",
                    r.id,
                    r.sequence,
                    if r.duplicate { "\tduplicate" } else { "" }
                );
            }
            batch.clear();
        }
        if done {
            return Ok(());
        }
    }
}

async fn subscribe(a: SubscribeArgs, channel: tonic::transport::Channel) -> anyhow::Result<()> {
    let subscriber = Subscriber::new(channel, Backoff::default());
    let mut sub = subscriber.subscribe(&a.subscription, FlowControl::default());
    let mut seen = 0u64;
    let mut awaiting = 0u64;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        if a.max.is_some_and(|max| seen >= max) && awaiting == 0 {
            return Ok(());
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            event = sub.next() => match event {
                Some(Ok(Event::Message(r))) => {
                    if a.max.is_some_and(|max| seen >= max) {
                        continue;
                    }
                    let m = r.message.unwrap_or_default();
                    println!(
                        "seq={}\tid={}\tkey={}\tattempt={}\t{}",
                        m.sequence,
                        m.id,
                        m.key,
                        r.attempt,
                        String::from_utf8_lossy(&m.payload)
                    );
                    seen += 1;
                    if !a.no_ack {
                        sub.ack(vec![r.ack_id]);
                        awaiting += 1;
                    }
                }
                Some(Ok(Event::Outcome(o))) => {
                    awaiting = awaiting.saturating_sub(1);
                    if o.result != proto::AckResult::Ok as i32 {
                        eprintln!("ack {} refused: {}", o.ack_id, o.detail);
                    }
                }
                Some(Err(s)) => return Err(grpc(s)),
                None => bail!("subscription ended"),
            }
        }
    }
}
