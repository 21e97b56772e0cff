//! The `tidings` command: parses flags (each also a `TIDINGS_*` environment
//! variable) and calls the library. Local commands (`local.rs`) run
//! something here; remote ones (`remote.rs`) talk to a broker.

mod bench;
mod local;
mod output;
mod relay_bench;
mod remote;
mod top;

use std::io::IsTerminal;

/// The broker and the relay allocate and free many short buffers across
/// threads (rows, requests, payloads); glibc's allocator spent a tenth of
/// a relay drain's CPU consolidating and unlinking chunks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use tidings::client::{ClientTls, ConnectOptions, DEFAULT_CONNECT_TIMEOUT};
use tidings::config::{self, DEFAULT_BROKER, HumanDuration};

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Reliable notifications between services"
)]
struct Cli {
    /// Broker address for client commands and the relay
    /// (http://HOST:PORT, or HOST:PORT) [default: http://127.0.0.1:50051].
    #[arg(long, global = true, env = "TIDINGS_BROKER")]
    broker: Option<String>,
    /// How long connecting to the broker may take before a client command
    /// fails (or `subscribe` says it is reconnecting).
    #[arg(long, global = true, env = "TIDINGS_CONNECT_TIMEOUT", default_value_t = HumanDuration(DEFAULT_CONNECT_TIMEOUT), value_parser = interval)]
    connect_timeout: HumanDuration,
    #[command(flatten)]
    tls: Credentials,
    /// What commands print: text for people, or JSON (one object per result,
    /// field names as in the API's JSON mapping).
    #[arg(
        long,
        global = true,
        env = "TIDINGS_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    output: Format,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "TIDINGS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Export spans to this OpenTelemetry collector (OTLP over gRPC, such
    /// as http://127.0.0.1:4317): the broker's and the relay's span for
    /// each message that carries a trace context (a child of it), and the
    /// commands' own spans at info.
    #[arg(long, global = true, env = "TIDINGS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// TLS files, for the broker (`serve`) or for a client of it, and a
/// client's token.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Credentials {
    /// PEM CA bundle. Client commands and the relay: the CAs that sign the
    /// broker's certificate (for an https:// broker; default: the Mozilla
    /// roots built in). serve: the CAs that sign client certificates
    /// (mutual TLS; see --tls-client-auth).
    #[arg(long, global = true, env = "TIDINGS_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// PEM certificate chain. serve: the broker's own, which turns TLS on
    /// (reread when the file changes). Client commands and the relay: the
    /// client's own, for a broker that asks for one.
    #[arg(long, global = true, env = "TIDINGS_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "TIDINGS_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Bearer token for a broker with access control (client commands and
    /// the relay).
    #[arg(long, global = true, env = "TIDINGS_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

impl Credentials {
    /// How a client reaches the broker with these credentials.
    pub(crate) fn connect_options(
        &self,
        connect_timeout: std::time::Duration,
    ) -> anyhow::Result<ConnectOptions> {
        Ok(ConnectOptions {
            connect_timeout,
            tls: self.client()?,
            token: self.token.clone(),
        })
    }

    /// A client's TLS settings, if any file was named.
    pub(crate) fn client(&self) -> anyhow::Result<Option<ClientTls>> {
        if self.tls_ca.is_none() && self.tls_cert.is_none() && self.tls_key.is_none() {
            return Ok(None);
        }
        Ok(Some(ClientTls::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )?))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Local(local::Local),
    #[command(flatten)]
    Remote(remote::Remote),
}

/// Parses a duration flag with the library's one parser.
fn duration(s: &str) -> Result<HumanDuration, tidings::Error> {
    config::parse_duration(s).map(HumanDuration)
}

/// Parses a flag that sets how often something repeats (zero refused).
fn interval(s: &str) -> Result<HumanDuration, tidings::Error> {
    config::parse_interval(s).map(HumanDuration)
}

/// Logs to standard error, as text or JSON, at `default` unless `RUST_LOG`
/// says otherwise; with `otlp` (endpoint, service name), also exports spans
/// there. Returns the exporter, to be shut down before exit.
fn init_logs(
    format: LogFormat,
    default: &str,
    otlp: Option<(&str, &str)>,
) -> anyhow::Result<Option<tidings::trace::otlp::Exporter>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt::layer()
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let exporter = otlp
        .map(|(endpoint, service)| tidings::trace::otlp::Exporter::new(endpoint, service))
        .transpose()?;
    let spans = exporter.as_ref().map(|e| {
        e.layer()
            .with_filter(EnvFilter::new(tidings::trace::otlp::DEFAULT_FILTER))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .init();
    Ok(exporter)
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Local(local::Local::Serve(_) | local::Local::Relay(_)) => "info",
        _ => "warn",
    };
    let service = match &cli.command {
        Command::Local(local::Local::Serve(_)) => "tidings-broker",
        Command::Local(local::Local::Relay(_)) => "tidings-relay",
        _ => "tidings",
    };
    let otlp = cli.otlp_endpoint.as_deref().map(|e| (e, service));
    let exporter = match init_logs(cli.log_format, default_level, otlp) {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Local(command) => local::run(command, cli.broker, &cli.tls, cli.output).await,
        Command::Remote(command) => {
            let broker = cli.broker.as_deref().unwrap_or(DEFAULT_BROKER);
            match cli.tls.connect_options(cli.connect_timeout.into()) {
                Ok(options) => remote::run(command, broker, options, cli.output).await,
                Err(e) => Err(e),
            }
        }
    };
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
