//! The commands that talk to a broker through the library's client: topics,
//! subscriptions, stats, publish, subscribe, health and dead letters. Each
//! prints text for people or, with `--output json`, JSON (see `output.rs`).

use std::collections::HashMap;
use std::io::BufRead;
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tidings::client::{
    self, Admin, Backoff, ConnectOptions, Connection, Event, FlowControl, Outgoing, Publisher,
    Serving, Subscriber,
};
use tidings::config::{DatabaseTimeouts, HumanDuration};
use tidings::model::{
    AckOperation, AckStatus, MessageState, Micros, PublishOutcome, SeekTarget, StartPosition,
    SubscriptionPatch, SubscriptionSettings, TopicPatch, TopicSettings,
};
use tidings::outbox::Outbox;
use tidings::store::NewSubscription;

use crate::output::{self, Format, human_duration, print_json};
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
    /// A live view of topics and subscriptions (rates, backlog, oldest
    /// unacked age, dead letters, blocked keys) and an outbox's relays.
    Top(crate::top::TopArgs),
    /// Show the messages waiting on a subscription, oldest first, without
    /// leasing them: no attempt, counter or lease changes.
    Peek {
        /// Subscription name.
        subscription: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        max: usize,
    },
    /// Check the broker's health; exits non-zero unless SERVING.
    Health {
        /// A service name, like tidings.v1.PublisherService (default: the
        /// whole server).
        #[arg(long, default_value = "", hide_default_value = true)]
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
        /// Keep acked messages this long for replay (0: not at all).
        #[arg(long, value_parser = duration, default_value = "0s")]
        retention: HumanDuration,
        /// Expire messages older than this, acked or not (0: never).
        #[arg(long, value_parser = duration, default_value = "0s")]
        max_age: HumanDuration,
        /// Succeed, changing nothing, if the topic exists already.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// Change a topic's settings; those not given stay as they are.
    #[command(group(clap::ArgGroup::new("changes").required(true).multiple(true)))]
    Update {
        /// Name.
        name: String,
        /// Keep acked messages this long for replay (0: not at all).
        #[arg(long, value_parser = duration, group = "changes")]
        retention: Option<HumanDuration>,
        /// Expire messages older than this, acked or not (0: never).
        #[arg(long, value_parser = duration, group = "changes")]
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
    /// Change a subscription's settings; those not given stay as they are.
    Update(UpdateSubscriptionArgs),
    /// List subscriptions.
    List {
        /// Only those of this topic (default: all).
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
        /// Deliver from the first message published at or after this time:
        /// Unix seconds or RFC 3339 (2024-05-01T12:00:00Z).
        #[arg(long, value_parser = output::parse_time)]
        time: Option<Micros>,
    },
}

/// The defaults a new subscription gets, shown in `--help`.
fn subscribed() -> SubscriptionSettings {
    SubscriptionSettings::default()
}

#[derive(Debug, Args)]
pub(crate) struct CreateSubscriptionArgs {
    /// Name.
    name: String,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Lease length.
    #[arg(long, value_parser = duration, default_value_t = HumanDuration(subscribed().ack_deadline))]
    ack_deadline: HumanDuration,
    /// Deliveries before dead-lettering.
    #[arg(long, default_value_t = subscribed().max_attempts)]
    max_attempts: i32,
    /// First backoff before a redelivery (doubles per attempt).
    #[arg(long, value_parser = duration, default_value_t = HumanDuration(subscribed().min_backoff))]
    min_backoff: HumanDuration,
    /// Longest backoff.
    #[arg(long, value_parser = duration, default_value_t = HumanDuration(subscribed().max_backoff))]
    max_backoff: HumanDuration,
    /// Topic that receives a copy of each dead letter (default: none).
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// One message per ordering key at a time, in order.
    #[arg(long)]
    ordered: bool,
    /// Where to start: earliest, latest, or a time (Unix seconds or RFC 3339).
    #[arg(long, default_value = "latest", value_parser = start_position)]
    start: StartPosition,
    /// Succeed, changing nothing, if the subscription exists already.
    #[arg(long)]
    if_not_exists: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("changes").required(true).multiple(true)))]
pub(crate) struct UpdateSubscriptionArgs {
    /// Name.
    name: String,
    /// New lease length.
    #[arg(long, value_parser = duration, group = "changes")]
    ack_deadline: Option<HumanDuration>,
    /// New deliveries before dead-lettering.
    #[arg(long, group = "changes")]
    max_attempts: Option<i32>,
    /// New first backoff.
    #[arg(long, value_parser = duration, group = "changes")]
    min_backoff: Option<HumanDuration>,
    /// New longest backoff.
    #[arg(long, value_parser = duration, group = "changes")]
    max_backoff: Option<HumanDuration>,
    /// New dead-letter topic.
    #[arg(long, group = "changes", conflicts_with = "no_dead_letter_topic")]
    dead_letter_topic: Option<String>,
    /// Stop copying dead letters to a topic.
    #[arg(long, group = "changes")]
    no_dead_letter_topic: bool,
    /// Make the subscription ordered (true) or not (false).
    #[arg(long, group = "changes", action = clap::ArgAction::Set)]
    ordered: Option<bool>,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Ordering key (default: none).
    #[arg(long)]
    key: Option<String>,
    /// An attribute NAME=VALUE; repeat for several.
    #[arg(long = "attribute", value_name = "NAME=VALUE", value_parser = attribute)]
    attributes: Vec<(String, String)>,
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
    /// Print without acking: at exit the messages are given back (released,
    /// without counting a delivery attempt) and delivered again.
    #[arg(long)]
    no_ack: bool,
    /// Exit after this many messages (default: run until stopped); at most
    /// this many are leased, and any extra is given back unshown.
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

/// Parses `--start`: earliest, latest, or a time.
fn start_position(s: &str) -> Result<StartPosition, String> {
    match s {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" => Ok(StartPosition::Latest),
        time => output::parse_time(time)
            .map(StartPosition::Time)
            .map_err(|e| format!("{e}; or earliest, latest")),
    }
}

/// Parses `--attribute NAME=VALUE`.
fn attribute(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?}: write an attribute as NAME=VALUE")),
    }
}

/// Rewrites the API's field names in a broker's error into the flags that
/// set them, for the commands where the CLI knows which flag that is.
fn name_flags(e: tidings::Error) -> anyhow::Error {
    let tidings::Error::InvalidArgument(mut text) = e else {
        return e.into();
    };
    for (field, flag) in [
        ("ack_deadline", "--ack-deadline"),
        ("max_attempts", "--max-attempts"),
        ("min_backoff", "--min-backoff"),
        ("max_backoff", "--max-backoff"),
        ("dead_letter_topic", "--dead-letter-topic"),
        ("dead-letter topic", "--dead-letter-topic"),
        ("max_age", "--max-age"),
        ("retention", "--retention"),
    ] {
        text = text.replace(field, flag);
    }
    anyhow!(text)
}

/// Says what to try when the broker cannot be reached.
fn explain(e: anyhow::Error, url: &str) -> anyhow::Error {
    match e.downcast_ref::<tidings::Error>() {
        Some(tidings::Error::Unavailable(_)) => anyhow!(
            "{e:#}\n  is `tidings serve` running at {url}, and is --broker (TIDINGS_BROKER) right?"
        ),
        _ => e,
    }
}

/// Runs a command against the broker at `url`.
pub(crate) async fn run(
    command: Remote,
    url: &str,
    options: ConnectOptions,
    format: Format,
) -> anyhow::Result<()> {
    let connect_timeout = options.connect_timeout;
    let connection = client::connect_with(url, options)?;
    let url = connection.url().to_owned();
    // Commands give up on an unreachable broker after the connect timeout,
    // rather than retrying for a minute in silence.
    let backoff = Backoff {
        give_up_after: Some(connect_timeout),
        ..Backoff::default()
    };
    let admin = Admin::new(&connection);
    let result = match command {
        Remote::Topics(c) => topics(&admin, c, format).await,
        Remote::Subscriptions(c) => subscriptions(&admin, c, format).await,
        Remote::Stats {
            subscription,
            outbox,
        } => {
            if let Some(db) = outbox {
                outbox_stats(&db, format).await?;
                if subscription.is_some() && format == Format::Text {
                    println!();
                }
            }
            match subscription {
                Some(name) => stats(&admin, &name, format).await,
                None => Ok(()),
            }
        }
        Remote::Publish(a) => publish(a, &connection, backoff, format).await,
        Remote::Subscribe(a) => subscribe(a, &connection, format).await,
        Remote::Top(a) => crate::top::run(a, &admin, &url, format).await,
        Remote::Peek { subscription, max } => {
            let subscriber = Subscriber::new(&connection, backoff);
            peek(&subscriber, &subscription, max, format).await
        }
        Remote::Health { service } => health(&admin, &service, format).await,
        Remote::DeadLetters(c) => dead_letters(&admin, c, format).await,
    };
    result.map_err(|e| explain(e, &url))
}

async fn health(admin: &Admin, service: &str, format: Format) -> anyhow::Result<()> {
    let status = admin.health(service).await?;
    match format {
        Format::Text => println!("{}", status.as_str()),
        Format::Json => print_json(&json!({ "status": status.as_str() })),
    }
    if status != Serving::Serving {
        bail!("broker is {}", status.as_str());
    }
    Ok(())
}

fn print_topic(t: &tidings::model::Topic, format: Format) {
    match format {
        Format::Text => println!(
            "name: {}\nlast_sequence: {}\nretention: {}\nmax_age: {}\nexpired: {}",
            t.name,
            t.last_sequence,
            human_duration(t.settings.retention),
            human_duration(t.settings.max_age),
            t.expired_count
        ),
        Format::Json => print_json(&output::topic(t)),
    }
}

async fn topics(admin: &Admin, command: TopicsCommand, format: Format) -> anyhow::Result<()> {
    match command {
        TopicsCommand::Create {
            name,
            retention,
            max_age,
            if_not_exists,
        } => {
            let settings = TopicSettings {
                retention: retention.into(),
                max_age: max_age.into(),
            };
            let (t, created) = match admin.create_topic_with(&name, settings).await {
                Ok(t) => (t, true),
                Err(tidings::Error::AlreadyExists(_)) if if_not_exists => {
                    (admin.get_topic(&name).await?, false)
                }
                Err(e) => return Err(name_flags(e)),
            };
            match format {
                Format::Text if created => println!("created topic {}", t.name),
                Format::Text => println!("topic {} exists already", t.name),
                Format::Json => print_json(&output::topic(&t)),
            }
        }
        TopicsCommand::Update {
            name,
            retention,
            max_age,
        } => {
            let patch = TopicPatch {
                retention: retention.map(Into::into),
                max_age: max_age.map(Into::into),
            };
            let t = admin.update_topic(&name, patch).await.map_err(name_flags)?;
            print_topic(&t, format);
        }
        TopicsCommand::List => {
            let topics = admin.list_topics().await?;
            match format {
                Format::Text => {
                    for t in &topics {
                        println!("{}\tlast_sequence={}", t.name, t.last_sequence);
                    }
                    if topics.is_empty() {
                        println!("no topics");
                    }
                }
                Format::Json => print_json(
                    &json!({ "topics": topics.iter().map(output::topic).collect::<Vec<_>>() }),
                ),
            }
        }
        TopicsCommand::Get { name } => print_topic(&admin.get_topic(&name).await?, format),
        TopicsCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            match format {
                Format::Text => println!("deleted topic {name}"),
                Format::Json => print_json(&json!({})),
            }
        }
    }
    Ok(())
}

fn print_subscription(s: &tidings::model::Subscription, format: Format) {
    let c = &s.settings;
    match format {
        Format::Text => println!(
            "name: {}\ntopic: {}\nack_deadline: {}\nmax_attempts: {}\nmin_backoff: {}\nmax_backoff: {}\ndead_letter_topic: {}\nordered: {}",
            s.name,
            s.topic,
            human_duration(c.ack_deadline),
            c.max_attempts,
            human_duration(c.min_backoff),
            human_duration(c.max_backoff),
            c.dead_letter_topic.as_deref().unwrap_or("none"),
            c.ordered
        ),
        Format::Json => print_json(&output::subscription(s)),
    }
}

async fn subscriptions(
    admin: &Admin,
    command: SubscriptionsCommand,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        SubscriptionsCommand::Create(a) => {
            let name = a.name.clone();
            let new = NewSubscription {
                name: a.name,
                topic: a.topic,
                settings: SubscriptionSettings {
                    ack_deadline: a.ack_deadline.into(),
                    max_attempts: a.max_attempts,
                    min_backoff: a.min_backoff.into(),
                    max_backoff: a.max_backoff.into(),
                    dead_letter_topic: a.dead_letter_topic,
                    ordered: a.ordered,
                },
                start: a.start,
            };
            let (s, created) = match admin.create_subscription(new).await {
                Ok(s) => (s, true),
                Err(tidings::Error::AlreadyExists(_)) if a.if_not_exists => {
                    (admin.get_subscription(&name).await?, false)
                }
                Err(e) => return Err(name_flags(e)),
            };
            match format {
                Format::Text if created => {
                    println!("created subscription {} on topic {}", s.name, s.topic)
                }
                Format::Text => println!(
                    "subscription {} exists already (on topic {})",
                    s.name, s.topic
                ),
                Format::Json => print_json(&output::subscription(&s)),
            }
        }
        SubscriptionsCommand::Update(a) => {
            let patch = SubscriptionPatch {
                ack_deadline: a.ack_deadline.map(Into::into),
                max_attempts: a.max_attempts,
                min_backoff: a.min_backoff.map(Into::into),
                max_backoff: a.max_backoff.map(Into::into),
                dead_letter_topic: match (a.dead_letter_topic, a.no_dead_letter_topic) {
                    (Some(t), _) => Some(Some(t)),
                    (None, true) => Some(None),
                    (None, false) => None,
                },
                ordered: a.ordered,
            };
            let s = admin
                .update_subscription(&a.name, patch)
                .await
                .map_err(name_flags)?;
            print_subscription(&s, format);
        }
        SubscriptionsCommand::List { topic } => {
            let subs = admin.list_subscriptions(topic.as_deref()).await?;
            match format {
                Format::Text => {
                    for s in &subs {
                        println!(
                            "{}\ttopic={}\tordered={}",
                            s.name, s.topic, s.settings.ordered
                        );
                    }
                    if subs.is_empty() {
                        println!("no subscriptions");
                    }
                }
                Format::Json => print_json(&json!({
                    "subscriptions": subs.iter().map(output::subscription).collect::<Vec<_>>()
                })),
            }
        }
        SubscriptionsCommand::Get { name } => {
            print_subscription(&admin.get_subscription(&name).await?, format)
        }
        SubscriptionsCommand::Delete { name } => {
            admin.delete_subscription(&name).await?;
            match format {
                Format::Text => println!("deleted subscription {name}"),
                Format::Json => print_json(&json!({})),
            }
        }
        SubscriptionsCommand::Stats { name } => stats(admin, &name, format).await?,
        SubscriptionsCommand::Seek {
            name,
            sequence,
            time,
        } => {
            let target = match (sequence, time) {
                (Some(sequence), _) => SeekTarget::Sequence(sequence),
                (None, us) => SeekTarget::Time(us.unwrap_or_default()),
            };
            let next = admin.seek(&name, target).await.map_err(|e| match e {
                tidings::Error::InvalidArgument(m) => anyhow!(
                    "{}",
                    m.replace("sequence", "--sequence")
                        .replace("time", "--time")
                ),
                e => e.into(),
            })?;
            match format {
                Format::Text => println!("{name} delivers from sequence {next} on"),
                Format::Json => print_json(&json!({ "nextSequence": next })),
            }
        }
    }
    Ok(())
}

async fn stats(admin: &Admin, name: &str, format: Format) -> anyhow::Result<()> {
    let s = admin.stats(name).await?;
    if format == Format::Json {
        print_json(&output::stats(name, &s));
        return Ok(());
    }
    let blocked = if s.blocked_key_sample.is_empty() {
        String::new()
    } else {
        format!(" (such as {})", s.blocked_key_sample.join(", "))
    };
    println!(
        "subscription: {name}\nbacklog: {}\nin_flight: {}\noldest_unacked_age: {}\ndead_lettered: {}\ndelivered: {}\nacked: {}\nredelivered: {}\nblocked_keys: {}{blocked}\nack_watermark: {}",
        s.backlog,
        s.in_flight,
        s.oldest_unacked_age
            .map_or_else(|| "none".into(), |d| format!("{:.3}s", d.as_secs_f64())),
        s.dead_lettered,
        s.delivered,
        s.acked,
        s.redelivered,
        s.blocked_keys,
        s.ack_watermark
    );
    Ok(())
}

async fn dead_letters(
    admin: &Admin,
    command: DeadLettersCommand,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List { subscription } => {
            let letters = admin.list_dead_letters(&subscription).await?;
            if format == Format::Json {
                print_json(&json!({
                    "deadLetters": letters.iter().map(output::dead_letter).collect::<Vec<_>>()
                }));
                return Ok(());
            }
            for d in &letters {
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
            if letters.is_empty() {
                println!("no dead letters");
            }
        }
        DeadLettersCommand::Redrive {
            subscription,
            sequences,
        } => {
            let n = admin.redrive_dead_letters(&subscription, sequences).await?;
            match format {
                Format::Text => println!("redriven: {n}"),
                Format::Json => print_json(&json!({ "redrivenCount": n })),
            }
        }
        DeadLettersCommand::Purge {
            subscription,
            sequences,
            all,
        } => {
            let which = (!all).then_some(sequences);
            let n = admin
                .purge_dead_letters(&subscription, which)
                .await
                .map_err(|e| match e {
                    tidings::Error::InvalidArgument(m) => anyhow!(
                        "{}",
                        m.replace("sequences", "--sequence")
                            .replace(" all", " --all")
                    ),
                    e => e.into(),
                })?;
            match format {
                Format::Text => println!("purged: {n}"),
                Format::Json => print_json(&json!({ "purgedCount": n })),
            }
        }
    }
    Ok(())
}

fn print_outcomes(outcomes: &[PublishOutcome], format: Format) {
    if format == Format::Json {
        print_json(&json!({
            "results": outcomes.iter().map(output::publish_result).collect::<Vec<_>>()
        }));
        return;
    }
    for r in outcomes {
        println!(
            "{}\tsequence={}{}",
            r.id,
            r.sequence,
            if r.duplicate { "\tduplicate" } else { "" }
        );
    }
}

async fn publish(
    a: PublishArgs,
    connection: &Connection,
    backoff: Backoff,
    format: Format,
) -> anyhow::Result<()> {
    let publisher = Publisher::new(connection, backoff);
    let attributes: HashMap<String, String> = a.attributes.iter().cloned().collect();
    let make = |data: Vec<u8>| {
        let mut m = Outgoing::new(a.topic.clone(), data);
        m.key = a.key.clone();
        m.attributes = attributes.clone();
        m
    };
    if let Some(data) = &a.data {
        let mut m = make(data.clone().into_bytes());
        if let Some(id) = a.id {
            m.id = id;
        }
        print_outcomes(&publisher.publish(&[m]).await?, format);
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
            print_outcomes(&publisher.publish(&batch).await?, format);
            batch.clear();
        }
        if done {
            return Ok(());
        }
    }
}

async fn subscribe(
    a: SubscribeArgs,
    connection: &Connection,
    format: Format,
) -> anyhow::Result<()> {
    let subscriber = Subscriber::new(connection, Backoff::default());
    // With --max, lease no more than will be shown.
    let mut flow = FlowControl::default();
    if let Some(max) = a.max {
        flow.max_messages = flow
            .max_messages
            .min(i32::try_from(max.max(1)).unwrap_or(i32::MAX));
    }
    let mut sub = subscriber.subscribe(&a.subscription, flow);
    let (result, unacked) = show(&a, &mut sub, connection.url(), format).await;
    // Messages shown but not acked (--no-ack) go back without counting a
    // delivery attempt; then the stream closes gracefully, so that nothing
    // this command held counts as a failed attempt.
    sub.release(unacked);
    sub.close(CLOSE_TIMEOUT).await;
    result
}

async fn peek(
    subscriber: &Subscriber,
    subscription: &str,
    max: usize,
    format: Format,
) -> anyhow::Result<()> {
    let messages = subscriber.peek(subscription, max).await?;
    if format == Format::Json {
        print_json(&json!({
            "messages": messages.iter().map(output::peeked).collect::<Vec<_>>()
        }));
        return Ok(());
    }
    for p in &messages {
        let m = &p.message;
        let state = match p.available_at {
            Some(at) if p.state != MessageState::Ready => {
                format!(
                    "{} until {}",
                    output::state_name(p.state),
                    output::rfc3339(at)
                )
            }
            _ => output::state_name(p.state).to_owned(),
        };
        println!(
            "seq={}\tid={}\tkey={}\tstate={}\tattempts={}\t{}",
            m.sequence,
            m.id,
            m.key.as_deref().unwrap_or_default(),
            state,
            p.attempts,
            String::from_utf8_lossy(&m.payload)
        );
    }
    if messages.is_empty() {
        println!("no messages waiting");
    }
    Ok(())
}

/// How long `subscribe` waits at exit for the broker to take back what it
/// held.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Prints deliveries until `--max` or a signal; returns how it ended and the
/// ack ids of messages shown but not acked.
async fn show(
    a: &SubscribeArgs,
    sub: &mut tidings::client::Subscription,
    url: &str,
    format: Format,
) -> (anyhow::Result<()>, Vec<String>) {
    let mut unacked = Vec::new();
    let result = show_until_done(a, sub, url, format, &mut unacked).await;
    (result, unacked)
}

async fn show_until_done(
    a: &SubscribeArgs,
    sub: &mut tidings::client::Subscription,
    url: &str,
    format: Format,
    unacked: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut down = sub.down();
    let url = url.to_owned();
    let mut seen = 0u64;
    let mut awaiting = 0u64;
    let mut was_down = false;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        if a.max.is_some_and(|max| seen >= max) && awaiting == 0 {
            return Ok(());
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            changed = down.changed() => {
                if changed.is_err() {
                    continue;
                }
                // A visible line while the stream is down, and one when it
                // is back: the subscription retries by itself, silently.
                let why = down.borrow_and_update().clone();
                match why {
                    Some(e) => {
                        eprintln!("reconnecting to {url}… ({e})");
                        if !was_down {
                            eprintln!("  is `tidings serve` running there, and is --broker (TIDINGS_BROKER) right?");
                        }
                        was_down = true;
                    }
                    None if was_down => {
                        eprintln!("connected to {url}");
                        was_down = false;
                    }
                    None => {}
                }
            }
            event = sub.next() => match event {
                Some(Ok(Event::Message(d))) => {
                    if a.max.is_some_and(|max| seen >= max) {
                        // One more than asked for: back unshown.
                        sub.release(vec![d.ack_id.to_string()]);
                        awaiting += 1;
                        continue;
                    }
                    match format {
                        Format::Json => print_json(&output::delivery(&d)),
                        Format::Text => {
                            let m = &d.message;
                            println!(
                                "seq={}\tid={}\tkey={}\tattempt={}\t{}",
                                m.sequence,
                                m.id,
                                m.key.as_deref().unwrap_or_default(),
                                d.attempt,
                                String::from_utf8_lossy(&m.payload)
                            );
                        }
                    }
                    seen += 1;
                    if a.no_ack {
                        unacked.push(d.ack_id.to_string());
                    } else {
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
                            let what = match o.operation {
                                AckOperation::Release => "release",
                                _ => "ack",
                            };
                            eprintln!("{what} {} refused: {detail}", o.ack_id);
                        }
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => bail!("subscription ended"),
            }
        }
    }
}

/// Opens an outbox database with these bounds, refusing a SQLite file that
/// does not exist (opening would create an empty one) and naming the
/// database in every error.
pub(crate) async fn open_outbox(
    url: &str,
    create_if_missing: bool,
    timeouts: DatabaseTimeouts,
) -> anyhow::Result<Outbox> {
    if let Some(path) = sqlite_path(url)
        && !create_if_missing
        && !std::path::Path::new(&path).exists()
    {
        bail!(
            "the SQLite database {path} does not exist: check --database-url, or pass --create-if-missing to create it"
        );
    }
    let shown = match sqlite_path(url) {
        Some(path) => path,
        None => tidings::store::redact(url),
    };
    Outbox::connect_with(url, timeouts).await.map_err(|e| {
        anyhow!(
            "cannot open the outbox database {shown}: {}",
            tidy(&e.to_string())
        )
    })
}

/// The file a `sqlite:` URL names, or `None` for other URLs and in-memory
/// databases.
pub(crate) fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.contains("mode=memory") {
        return None;
    }
    Some(path.to_owned())
}

/// A database error without PostgreSQL's source position (`at line 948`
/// of the server's C file), which says nothing to a user.
pub(crate) fn tidy(text: &str) -> String {
    let mut out = text.to_owned();
    while let Some(at) = out.find(" at line ") {
        let digits = out[at + 9..].bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            break;
        }
        let mut end = at + 9 + digits;
        // "at line 948 in postinit.c": the file goes too.
        if let Some(file) = out[end..].strip_prefix(" in ") {
            end += 4 + file
                .find(|c: char| c.is_whitespace() || c == ')')
                .unwrap_or(file.len());
        }
        out.replace_range(at..end, "");
    }
    out
}

async fn outbox_stats(url: &str, format: Format) -> anyhow::Result<()> {
    let s = open_outbox(url, false, DatabaseTimeouts::default())
        .await?
        .stats()
        .await?;
    let rfc = |t: SystemTime| output::rfc3339(tidings::model::time_micros(t));
    if format == Format::Json {
        let relays: Vec<_> = s
            .relays
            .iter()
            .map(|r| {
                json!({
                    "relay": r.relay,
                    "alive": r.alive,
                    "leader": r.leader,
                    "published": r.published,
                    "lastPublishTime": r.last_publish.map(rfc),
                    "heartbeatTime": rfc(r.heartbeat),
                    "heartbeatAge": output::proto_duration(r.heartbeat_age),
                    "heartbeatInterval": r.heartbeat_interval.map(output::proto_duration),
                    "lastError": r.last_error,
                })
            })
            .collect();
        print_json(&json!({
            "outboxDepth": s.depth,
            "held": s.held,
            "oldestPendingAge": s.oldest_age.map(output::proto_duration),
            "heldError": s.held_error,
            "leaders": s.leaders,
            "relays": relays,
        }));
        return Ok(());
    }
    let ago = |t: SystemTime| {
        t.elapsed()
            .map(|d| format!("{:.1}s ago", d.as_secs_f64()))
            .unwrap_or_else(|_| "just now".into())
    };
    println!(
        "outbox_depth: {}\nheld: {}\noldest_pending_age: {}\nheld_error: {}\nleader: {}",
        s.depth,
        s.held,
        s.oldest_age
            .map(|d| format!("{:.3}s", d.as_secs_f64()))
            .unwrap_or_else(|| "none".into()),
        s.held_error.as_deref().unwrap_or("none"),
        if s.leaders.is_empty() {
            "none".to_owned()
        } else {
            s.leaders.join(", ")
        },
    );
    for r in &s.relays {
        let interval = match r.heartbeat_interval {
            Some(d) => output::human_duration(d),
            None => format!(
                "{} (default; not recorded)",
                output::human_duration(tidings::outbox::DEFAULT_HEARTBEAT_INTERVAL)
            ),
        };
        // A gone relay's leadership is only what it last said; a live one's
        // is current.
        let (state, leader) = if r.alive {
            ("alive", "leader")
        } else {
            ("gone", "was_leader")
        };
        println!(
            "relay: {} state={state} {leader}={} published={} last_publish={} heartbeat={:.1}s ago \
             heartbeat_interval={interval} last_error={}",
            r.relay,
            r.leader,
            r.published,
            r.last_publish.map(ago).unwrap_or_else(|| "never".into()),
            r.heartbeat_age.as_secs_f64(),
            r.last_error.as_deref().unwrap_or("none"),
        );
    }
    if s.relays.is_empty() {
        println!("relay: none reported");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(sqlite_path("sqlite://app.db").as_deref(), Some("app.db"));
        assert_eq!(
            sqlite_path("sqlite:///tmp/a.db?mode=rwc").as_deref(),
            Some("/tmp/a.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }

    #[test]
    fn postgres_source_positions_are_dropped() {
        assert_eq!(
            tidy(
                "error returned from database: database \"x\" does not exist at line 948 in postinit.c"
            ),
            "error returned from database: database \"x\" does not exist"
        );
        assert_eq!(tidy("no line here"), "no line here");
    }
}
