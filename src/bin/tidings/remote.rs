//! The commands that talk to a broker through the library's client: topics,
//! subscriptions, stats, publish, subscribe, health and dead letters.

use std::io::BufRead;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tidings::client::{
    self, Admin, Backoff, Connection, Event, FlowControl, Outgoing, Publisher, Serving, Subscriber,
};
use tidings::config::HumanDuration;
use tidings::model::{
    AckStatus, PublishOutcome, SeekTarget, StartPosition, SubscriptionSettings, TopicSettings,
    time_micros,
};
use tidings::outbox::Outbox;
use tidings::store::NewSubscription;

use crate::{duration, shutdown_signal};

/// Messages per publish request when publishing standard input.
const STDIN_BATCH: usize = 500;

/// Commands that talk to a broker.
#[derive(Debug, Subcommand)]
pub(crate) enum Remote {
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
}

#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create a topic.
    Create {
        /// Name.
        name: String,
        /// Keep acked messages this long for replay.
        #[arg(long, value_parser = duration)]
        retention: Option<HumanDuration>,
        /// Expire messages older than this, acked or not.
        #[arg(long, value_parser = duration)]
        max_age: Option<HumanDuration>,
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
pub(crate) enum SubscriptionsCommand {
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
    /// Move a subscription's cursor to a sequence number or a time.
    Seek {
        /// Name.
        name: String,
        /// First sequence number to deliver.
        #[arg(long, required_unless_present = "time", conflicts_with = "time")]
        sequence: Option<i64>,
        /// Deliver from the first message published at or after this Unix
        /// time, in seconds.
        #[arg(long)]
        time: Option<u64>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct CreateSubscriptionArgs {
    /// Name.
    name: String,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Lease length.
    #[arg(long, value_parser = duration)]
    ack_deadline: Option<HumanDuration>,
    /// Deliveries before dead-lettering.
    #[arg(long)]
    max_attempts: Option<i32>,
    /// First backoff.
    #[arg(long, value_parser = duration)]
    min_backoff: Option<HumanDuration>,
    /// Longest backoff.
    #[arg(long, value_parser = duration)]
    max_backoff: Option<HumanDuration>,
    /// Topic that receives a copy of each dead letter.
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// One message per ordering key at a time, in order.
    #[arg(long)]
    ordered: bool,
    /// Where to start: earliest, latest, or a Unix time in seconds.
    #[arg(long, default_value = "latest", value_parser = start_position)]
    start: StartPosition,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Ordering key.
    #[arg(long)]
    key: Option<String>,
    /// Message id (UUID); only with DATA. Default: a fresh UUID v7.
    #[arg(long, requires = "data")]
    id: Option<uuid::Uuid>,
    /// Payload; without it, each line of standard input is one message.
    data: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct SubscribeArgs {
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
pub(crate) enum DeadLettersCommand {
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
        #[arg(long = "sequence", required_unless_present = "all")]
        sequences: Vec<i64>,
        /// All of them.
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
    },
}

/// Parses `--start`: earliest, latest, or a Unix time in seconds.
fn start_position(s: &str) -> Result<StartPosition, String> {
    match s {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" => Ok(StartPosition::Latest),
        secs => secs
            .parse::<i64>()
            .map(|secs| StartPosition::Time(secs.saturating_mul(1_000_000)))
            .map_err(|_| format!("{secs:?}: use earliest, latest or a Unix time in seconds")),
    }
}

/// Runs a command against the broker at `url`.
pub(crate) async fn run(command: Remote, url: &str) -> anyhow::Result<()> {
    let connection = client::connect(url)?;
    let admin = Admin::new(&connection);
    match command {
        Remote::Topics(c) => topics(&admin, c).await,
        Remote::Subscriptions(c) => subscriptions(&admin, c).await,
        Remote::Stats {
            subscription,
            outbox,
        } => {
            if let Some(url) = outbox {
                outbox_stats(&url).await?;
                if subscription.is_some() {
                    println!();
                }
            }
            match subscription {
                Some(name) => stats(&admin, &name).await,
                None => Ok(()),
            }
        }
        Remote::Publish(a) => publish(a, &connection).await,
        Remote::Subscribe(a) => subscribe(a, &connection).await,
        Remote::Health { service } => {
            let status = admin.health(&service).await?;
            println!("{}", status.as_str());
            if status != Serving::Serving {
                bail!("broker is {}", status.as_str());
            }
            Ok(())
        }
        Remote::DeadLetters(c) => dead_letters(&admin, c).await,
    }
}

async fn topics(admin: &Admin, command: TopicsCommand) -> anyhow::Result<()> {
    match command {
        TopicsCommand::Create {
            name,
            retention,
            max_age,
        } => {
            let settings = TopicSettings {
                retention: retention.unwrap_or_default().into(),
                max_age: max_age.unwrap_or_default().into(),
            };
            let t = admin.create_topic_with(&name, settings).await?;
            println!("created topic {}", t.name);
        }
        TopicsCommand::List => {
            for t in admin.list_topics().await? {
                println!("{}\tlast_sequence={}", t.name, t.last_sequence);
            }
        }
        TopicsCommand::Get { name } => {
            let t = admin.get_topic(&name).await?;
            println!(
                "name: {}\nlast_sequence: {}\nretention: {:?}\nmax_age: {:?}\nexpired: {}",
                t.name, t.last_sequence, t.settings.retention, t.settings.max_age, t.expired_count
            );
        }
        TopicsCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

async fn subscriptions(admin: &Admin, command: SubscriptionsCommand) -> anyhow::Result<()> {
    match command {
        SubscriptionsCommand::Create(a) => {
            let d = SubscriptionSettings::default();
            let new = NewSubscription {
                name: a.name,
                topic: a.topic,
                settings: SubscriptionSettings {
                    ack_deadline: a.ack_deadline.map_or(d.ack_deadline, Into::into),
                    max_attempts: a.max_attempts.unwrap_or(d.max_attempts),
                    min_backoff: a.min_backoff.map_or(d.min_backoff, Into::into),
                    max_backoff: a.max_backoff.map_or(d.max_backoff, Into::into),
                    dead_letter_topic: a.dead_letter_topic,
                    ordered: a.ordered,
                },
                start: a.start,
            };
            let s = admin.create_subscription(new).await?;
            println!("created subscription {} on topic {}", s.name, s.topic);
        }
        SubscriptionsCommand::List { topic } => {
            for s in admin.list_subscriptions(topic.as_deref()).await? {
                println!(
                    "{}\ttopic={}\tordered={}",
                    s.name, s.topic, s.settings.ordered
                );
            }
        }
        SubscriptionsCommand::Get { name } => {
            let s = admin.get_subscription(&name).await?;
            let c = &s.settings;
            println!(
                "name: {}\ntopic: {}\nack_deadline: {:?}\nmax_attempts: {}\nmin_backoff: {:?}\nmax_backoff: {:?}\ndead_letter_topic: {}\nordered: {}",
                s.name,
                s.topic,
                c.ack_deadline,
                c.max_attempts,
                c.min_backoff,
                c.max_backoff,
                c.dead_letter_topic.as_deref().unwrap_or_default(),
                c.ordered
            );
        }
        SubscriptionsCommand::Delete { name } => {
            admin.delete_subscription(&name).await?;
            println!("deleted subscription {name}");
        }
        SubscriptionsCommand::Stats { name } => stats(admin, &name).await?,
        SubscriptionsCommand::Seek {
            name,
            sequence,
            time,
        } => {
            let target = match (sequence, time) {
                (Some(sequence), _) => SeekTarget::Sequence(sequence),
                (None, secs) => SeekTarget::Time(time_micros(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unwrap_or_default()),
                )),
            };
            let next = admin.seek(&name, target).await?;
            println!("{name} delivers from sequence {next} on");
        }
    }
    Ok(())
}

async fn stats(admin: &Admin, name: &str) -> anyhow::Result<()> {
    let s = admin.stats(name).await?;
    println!(
        "subscription: {name}\nbacklog: {}\nin_flight: {}\noldest_unacked_age: {}\ndead_lettered: {}\ndelivered: {}\nacked: {}\nredelivered: {}\nblocked_keys: {} {:?}\nack_watermark: {}",
        s.backlog,
        s.in_flight,
        s.oldest_unacked_age
            .map_or_else(|| "-".into(), |d| format!("{d:?}")),
        s.dead_lettered,
        s.delivered,
        s.acked,
        s.redelivered,
        s.blocked_keys,
        s.blocked_key_sample,
        s.ack_watermark
    );
    Ok(())
}

async fn dead_letters(admin: &Admin, command: DeadLettersCommand) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List { subscription } => {
            for d in admin.list_dead_letters(&subscription).await? {
                let m = &d.message;
                println!(
                    "seq={}\tid={}\tattempts={}\treason={:?}\tpayload={}",
                    m.sequence,
                    m.id,
                    d.attempts,
                    d.reason,
                    String::from_utf8_lossy(&m.payload)
                );
            }
        }
        DeadLettersCommand::Redrive {
            subscription,
            sequences,
        } => {
            let n = admin.redrive_dead_letters(&subscription, sequences).await?;
            println!("redriven: {n}");
        }
        DeadLettersCommand::Purge {
            subscription,
            sequences,
            all,
        } => {
            let which = (!all).then_some(sequences);
            let n = admin.purge_dead_letters(&subscription, which).await?;
            println!("purged: {n}");
        }
    }
    Ok(())
}

fn print_outcomes(outcomes: &[PublishOutcome]) {
    for r in outcomes {
        println!(
            "{}\tsequence={}{}",
            r.id,
            r.sequence,
            if r.duplicate { "\tduplicate" } else { "" }
        );
    }
}

async fn publish(a: PublishArgs, connection: &Connection) -> anyhow::Result<()> {
    let publisher = Publisher::new(connection, Backoff::default());
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
        print_outcomes(&publisher.publish(&[m]).await?);
        return Ok(());
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
        if batch.len() >= STDIN_BATCH || (done && !batch.is_empty()) {
            print_outcomes(&publisher.publish(&batch).await?);
            batch.clear();
        }
        if done {
            return Ok(());
        }
    }
}

async fn subscribe(a: SubscribeArgs, connection: &Connection) -> anyhow::Result<()> {
    let subscriber = Subscriber::new(connection, Backoff::default());
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
                Some(Ok(Event::Message(d))) => {
                    if a.max.is_some_and(|max| seen >= max) {
                        continue;
                    }
                    let m = &d.message;
                    println!(
                        "seq={}\tid={}\tkey={}\tattempt={}\t{}",
                        m.sequence,
                        m.id,
                        m.key.as_deref().unwrap_or_default(),
                        d.attempt,
                        String::from_utf8_lossy(&m.payload)
                    );
                    seen += 1;
                    if !a.no_ack {
                        sub.ack(vec![d.ack_id.to_string()]);
                        awaiting += 1;
                    }
                }
                Some(Ok(Event::Malformed { ack_id, reason })) => {
                    eprintln!("delivery {ack_id} unreadable: {reason}");
                }
                Some(Ok(Event::Outcome(o))) => {
                    awaiting = awaiting.saturating_sub(1);
                    match o.status {
                        AckStatus::Ok(_) => {}
                        AckStatus::Stale(detail) | AckStatus::Unknown(detail) => {
                            eprintln!("ack {} refused: {detail}", o.ack_id);
                        }
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => bail!("subscription ended"),
            }
        }
    }
}

async fn outbox_stats(url: &str) -> anyhow::Result<()> {
    let s = Outbox::connect(url).await?.stats().await?;
    let ago = |t: SystemTime| {
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
