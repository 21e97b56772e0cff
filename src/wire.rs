//! Every conversion between `tidings.v1` protobuf types and the domain, in
//! both directions: what the server decodes and encodes, and the inverses a
//! client needs. Conversions fail with `Error::InvalidArgument` naming the
//! field; mapping `Error` to a gRPC status is the server's job.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::{
    self, AckId, AckOperation, AckOutcome, AckStatus, DeadLetter, Delivery, FlowControl,
    LeaseExtension, MessageState, Micros, Nack, NewMessage, PeekedMessage, PublishOutcome,
    SeekTarget, SessionCommand, SessionEvent, StartPosition, StoredMessage, Subscription,
    SubscriptionSettings, SubscriptionStats, Topic, TopicSettings,
};
use crate::model::{NewSubscription, SubscriptionPatch, TopicPatch};
use crate::proto;

pub use crate::proto::duration;

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// A required message field, or an error naming it.
fn required<T>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| invalid(format!("{field} is missing")))
}

/// An instant in its wire form.
pub fn timestamp(us: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// A wire instant in microseconds since the Unix epoch (saturating). The
/// inverse of [`timestamp`] for every instant, the extremes included.
pub fn micros_of(t: &prost_types::Timestamp) -> Micros {
    let us = i128::from(t.seconds) * 1_000_000 + i128::from(t.nanos) / 1000;
    Micros::try_from(us).unwrap_or(if us < 0 { Micros::MIN } else { Micros::MAX })
}

/// The range of a valid `google.protobuf.Timestamp`: 0001-01-01T00:00:00Z
/// to 9999-12-31T23:59:59.999999999Z.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A wire instant a client sent, in microseconds since the Unix epoch.
///
/// Fails with `InvalidArgument` naming `field` if it is outside the range a
/// protobuf Timestamp may hold (years 1 to 9999) or its nanos are not in
/// 0..1e9.
pub fn checked_time(t: &prost_types::Timestamp, field: &str) -> Result<Micros> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds) {
        return Err(invalid(format!(
            "{field} is outside the valid range of a timestamp (years 1 to 9999)"
        )));
    }
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(format!(
            "{field} has nanos {} (must be 0 to 999999999)",
            t.nanos
        )));
    }
    Ok(micros_of(t))
}

/// A wire duration as a std one.
///
/// Fails with `InvalidArgument` naming `field` if it is negative or
/// malformed.
pub fn std_duration(d: &prost_types::Duration, field: &str) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(invalid(format!("{field} must be a non-negative duration")));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// An optional wire duration as a std one; see [`std_duration`].
pub fn opt_duration(d: Option<&prost_types::Duration>, field: &str) -> Result<Option<Duration>> {
    d.map(|d| std_duration(d, field)).transpose()
}

fn opt_string(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn sorted(attributes: std::collections::HashMap<String, String>) -> Vec<(String, String)> {
    let mut attributes: Vec<(String, String)> = attributes.into_iter().collect();
    attributes.sort();
    attributes
}

impl TryFrom<proto::Message> for NewMessage {
    type Error = Error;

    /// Checks the id and the topic name of a message to publish.
    fn try_from(m: proto::Message) -> Result<Self> {
        let id = model::parse_message_id(&m.id)?;
        model::validate_name("topic", &m.topic)?;
        Ok(NewMessage {
            id,
            topic: m.topic,
            key: opt_string(m.key),
            payload: m.payload,
            attributes: sorted(m.attributes),
            created_at: m
                .create_time
                .as_ref()
                .map(|t| checked_time(t, "create_time"))
                .transpose()?,
        })
    }
}

/// The messages of a publish request; an error names the message's index.
///
/// Fails with `InvalidArgument` on the first message that does not convert.
pub fn new_messages(messages: Vec<proto::Message>) -> Result<Vec<NewMessage>> {
    messages
        .into_iter()
        .enumerate()
        .map(|(at, m)| NewMessage::try_from(m).map_err(|e| invalid(format!("message {at}: {e}"))))
        .collect()
}

impl From<NewMessage> for proto::Message {
    fn from(m: NewMessage) -> Self {
        proto::Message {
            id: m.id.to_string(),
            topic: m.topic,
            key: m.key.unwrap_or_default(),
            payload: m.payload,
            attributes: m.attributes.into_iter().collect(),
            create_time: m.created_at.map(timestamp),
            sequence: 0,
            publish_time: None,
        }
    }
}

impl From<StoredMessage> for proto::Message {
    fn from(m: StoredMessage) -> Self {
        proto::Message {
            id: m.id.to_string(),
            topic: m.topic,
            key: m.key.unwrap_or_default(),
            payload: m.payload,
            attributes: m.attributes.into_iter().collect(),
            create_time: m.created_at.map(timestamp),
            sequence: m.sequence,
            publish_time: Some(timestamp(m.published_at)),
        }
    }
}

impl TryFrom<proto::Message> for StoredMessage {
    type Error = Error;

    /// A delivered message; its id must be a UUID and its publish time set.
    fn try_from(m: proto::Message) -> Result<Self> {
        Ok(StoredMessage {
            id: model::parse_message_id(&m.id)?,
            topic: m.topic,
            key: opt_string(m.key),
            payload: m.payload,
            attributes: sorted(m.attributes),
            created_at: m.create_time.as_ref().map(micros_of),
            sequence: m.sequence,
            published_at: micros_of(&required(m.publish_time, "message.publish_time")?),
        })
    }
}

impl From<PublishOutcome> for proto::PublishResult {
    fn from(o: PublishOutcome) -> Self {
        proto::PublishResult {
            id: o.id.to_string(),
            sequence: o.sequence,
            duplicate: o.duplicate,
        }
    }
}

impl TryFrom<proto::PublishResult> for PublishOutcome {
    type Error = Error;

    fn try_from(r: proto::PublishResult) -> Result<Self> {
        Ok(PublishOutcome {
            id: model::parse_message_id(&r.id)?,
            sequence: r.sequence,
            duplicate: r.duplicate,
        })
    }
}

impl From<Delivery> for proto::ReceivedMessage {
    fn from(d: Delivery) -> Self {
        proto::ReceivedMessage {
            ack_id: d.ack_id.to_string(),
            attempt: d.attempt,
            lease_deadline: Some(timestamp(d.lease_deadline)),
            message: Some(d.message.into()),
        }
    }
}

impl TryFrom<proto::ReceivedMessage> for Delivery {
    type Error = Error;

    fn try_from(r: proto::ReceivedMessage) -> Result<Self> {
        Ok(Delivery {
            message: required(r.message, "received_message.message")?.try_into()?,
            ack_id: r.ack_id.parse::<AckId>()?,
            attempt: r.attempt,
            lease_deadline: micros_of(&required(
                r.lease_deadline,
                "received_message.lease_deadline",
            )?),
        })
    }
}

impl From<AckOperation> for proto::AckOperation {
    fn from(o: AckOperation) -> Self {
        match o {
            AckOperation::Ack => proto::AckOperation::Ack,
            AckOperation::Nack => proto::AckOperation::Nack,
            AckOperation::Extend => proto::AckOperation::Extend,
            AckOperation::Release => proto::AckOperation::Release,
        }
    }
}

impl From<AckOutcome> for proto::AckOutcome {
    fn from(o: AckOutcome) -> Self {
        let (result, detail, deadline) = match o.status {
            AckStatus::Ok(deadline) => (proto::AckResult::Ok, String::new(), deadline),
            AckStatus::Stale(d) => (proto::AckResult::Stale, d, None),
            AckStatus::Unknown(d) => (proto::AckResult::Unknown, d, None),
        };
        proto::AckOutcome {
            ack_id: o.ack_id,
            operation: proto::AckOperation::from(o.operation) as i32,
            result: result as i32,
            lease_deadline: deadline.map(timestamp),
            detail,
        }
    }
}

impl TryFrom<proto::AckOutcome> for AckOutcome {
    type Error = Error;

    fn try_from(o: proto::AckOutcome) -> Result<Self> {
        let operation = match proto::AckOperation::try_from(o.operation) {
            Ok(proto::AckOperation::Ack) => AckOperation::Ack,
            Ok(proto::AckOperation::Nack) => AckOperation::Nack,
            Ok(proto::AckOperation::Extend) => AckOperation::Extend,
            Ok(proto::AckOperation::Release) => AckOperation::Release,
            _ => {
                return Err(invalid(format!(
                    "ack_outcome.operation {} is not known",
                    o.operation
                )));
            }
        };
        let status = match proto::AckResult::try_from(o.result) {
            Ok(proto::AckResult::Ok) => AckStatus::Ok(o.lease_deadline.as_ref().map(micros_of)),
            Ok(proto::AckResult::Stale) => AckStatus::Stale(o.detail),
            Ok(proto::AckResult::Unknown) => AckStatus::Unknown(o.detail),
            _ => {
                return Err(invalid(format!(
                    "ack_outcome.result {} is not known",
                    o.result
                )));
            }
        };
        Ok(AckOutcome {
            ack_id: o.ack_id,
            operation,
            status,
        })
    }
}

impl TryFrom<proto::Nack> for Nack {
    type Error = Error;

    fn try_from(n: proto::Nack) -> Result<Self> {
        Ok(Nack {
            delay: opt_duration(n.delay.as_ref(), "nack.delay")?,
            ack_id: n.ack_id,
            reason: n.reason,
        })
    }
}

impl From<Nack> for proto::Nack {
    fn from(n: Nack) -> Self {
        proto::Nack {
            ack_id: n.ack_id,
            delay: n.delay.map(duration),
            reason: n.reason,
        }
    }
}

impl TryFrom<proto::LeaseExtension> for LeaseExtension {
    type Error = Error;

    fn try_from(e: proto::LeaseExtension) -> Result<Self> {
        let extension = e
            .extension
            .ok_or_else(|| invalid("lease extension needs a duration"))?;
        Ok(LeaseExtension {
            extension: std_duration(&extension, "extension")?,
            ack_id: e.ack_id,
        })
    }
}

impl From<LeaseExtension> for proto::LeaseExtension {
    fn from(e: LeaseExtension) -> Self {
        proto::LeaseExtension {
            ack_id: e.ack_id,
            extension: Some(duration(e.extension)),
        }
    }
}

/// Converts every item of a list, failing on the first that does not.
///
/// Fails with the first item's conversion error.
pub fn all<T, U>(items: Vec<T>) -> Result<Vec<U>>
where
    U: TryFrom<T, Error = Error>,
{
    items.into_iter().map(U::try_from).collect()
}

impl TryFrom<proto::SubscribeRequest> for SessionCommand {
    type Error = Error;

    /// A Subscribe request without its subscription name (which only the
    /// first request carries).
    fn try_from(r: proto::SubscribeRequest) -> Result<Self> {
        Ok(SessionCommand {
            flow: FlowControl {
                max_outstanding_messages: r.max_outstanding_messages,
                max_outstanding_bytes: r.max_outstanding_bytes,
                max_response_bytes: r.max_response_bytes,
            },
            acks: r.ack_ids,
            nacks: all(r.nacks)?,
            extensions: all(r.extensions)?,
            releases: r.release_ack_ids,
        })
    }
}

impl From<SessionCommand> for proto::SubscribeRequest {
    /// A Subscribe request with no subscription name; set it on the first.
    fn from(c: SessionCommand) -> Self {
        proto::SubscribeRequest {
            subscription: String::new(),
            max_outstanding_messages: c.flow.max_outstanding_messages,
            max_outstanding_bytes: c.flow.max_outstanding_bytes,
            max_response_bytes: c.flow.max_response_bytes,
            ack_ids: c.acks,
            nacks: c.nacks.into_iter().map(Into::into).collect(),
            extensions: c.extensions.into_iter().map(Into::into).collect(),
            release_ack_ids: c.releases,
        }
    }
}

impl From<SessionEvent> for proto::SubscribeResponse {
    fn from(e: SessionEvent) -> Self {
        proto::SubscribeResponse {
            messages: e.deliveries.into_iter().map(Into::into).collect(),
            outcomes: e.outcomes.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<proto::SubscribeResponse> for SessionEvent {
    type Error = Error;

    fn try_from(r: proto::SubscribeResponse) -> Result<Self> {
        Ok(SessionEvent {
            deliveries: all(r.messages)?,
            outcomes: all(r.outcomes)?,
        })
    }
}

impl From<Topic> for proto::Topic {
    fn from(t: Topic) -> Self {
        proto::Topic {
            name: t.name,
            create_time: Some(timestamp(t.created_at)),
            retention: Some(duration(t.settings.retention)),
            max_age: Some(duration(t.settings.max_age)),
            last_sequence: t.last_sequence,
            expired_count: t.expired_count,
        }
    }
}

impl From<(String, TopicSettings)> for proto::Topic {
    /// A topic to create: its name and settings.
    fn from((name, s): (String, TopicSettings)) -> Self {
        proto::Topic {
            name,
            retention: Some(duration(s.retention)),
            max_age: Some(duration(s.max_age)),
            ..Default::default()
        }
    }
}

impl TryFrom<&proto::Topic> for TopicSettings {
    type Error = Error;

    /// Settings of a topic; unset fields are zero.
    fn try_from(t: &proto::Topic) -> Result<Self> {
        Ok(TopicSettings {
            retention: opt_duration(t.retention.as_ref(), "retention")?.unwrap_or_default(),
            max_age: opt_duration(t.max_age.as_ref(), "max_age")?.unwrap_or_default(),
        })
    }
}

impl TryFrom<proto::Topic> for Topic {
    type Error = Error;

    fn try_from(t: proto::Topic) -> Result<Self> {
        Ok(Topic {
            settings: TopicSettings::try_from(&t)?,
            created_at: micros_of(&required(t.create_time, "topic.create_time")?),
            name: t.name,
            last_sequence: t.last_sequence,
            expired_count: t.expired_count,
        })
    }
}

/// The topic name and the masked fields of an UpdateTopic request.
///
/// Fails with `InvalidArgument` if the topic or the mask is missing, or the
/// mask names a field that cannot be updated.
pub fn topic_update(r: proto::UpdateTopicRequest) -> Result<(String, TopicPatch)> {
    let topic = required(r.topic, "topic")?;
    let settings = TopicSettings::try_from(&topic)?;
    let mut patch = TopicPatch::default();
    each_masked(r.update_mask, "topic", |path| {
        match path {
            "retention" => patch.retention = Some(settings.retention),
            "max_age" => patch.max_age = Some(settings.max_age),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((topic.name, patch))
}

impl From<(String, TopicPatch)> for proto::UpdateTopicRequest {
    /// An UpdateTopic request whose mask names the fields the patch sets.
    fn from((name, patch): (String, TopicPatch)) -> Self {
        let update_mask = mask(&[
            (patch.retention.is_some(), "retention"),
            (patch.max_age.is_some(), "max_age"),
        ]);
        proto::UpdateTopicRequest {
            topic: Some(proto::Topic {
                name,
                retention: patch.retention.map(duration),
                max_age: patch.max_age.map(duration),
                ..Default::default()
            }),
            update_mask: Some(update_mask),
        }
    }
}

/// Calls `set` with each path of an update mask; `set` answers false for a
/// field of `what` that cannot be updated.
fn each_masked(
    mask: Option<prost_types::FieldMask>,
    what: &str,
    mut set: impl FnMut(&str) -> Result<bool>,
) -> Result<()> {
    for path in mask_paths(mask)? {
        if !set(&path)? {
            return Err(invalid(format!(
                "field {path:?} of a {what} cannot be updated"
            )));
        }
    }
    Ok(())
}

/// The update mask naming the fields whose flag is set.
fn mask(fields: &[(bool, &str)]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: fields
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, path)| path.to_string())
            .collect(),
    }
}

fn mask_paths(mask: Option<prost_types::FieldMask>) -> Result<Vec<String>> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(invalid("update_mask is empty; name the fields to update"));
    }
    Ok(paths)
}

fn settings_to_proto(name: String, topic: String, s: SubscriptionSettings) -> proto::Subscription {
    proto::Subscription {
        name,
        topic,
        ack_deadline: Some(duration(s.ack_deadline)),
        max_attempts: s.max_attempts,
        min_backoff: Some(duration(s.min_backoff)),
        max_backoff: Some(duration(s.max_backoff)),
        dead_letter_topic: s.dead_letter_topic.unwrap_or_default(),
        ordered: s.ordered,
        start: None,
        create_time: None,
    }
}

impl From<Subscription> for proto::Subscription {
    fn from(s: Subscription) -> Self {
        proto::Subscription {
            create_time: Some(timestamp(s.created_at)),
            ..settings_to_proto(s.name, s.topic, s.settings)
        }
    }
}

impl TryFrom<&proto::Subscription> for SubscriptionSettings {
    type Error = Error;

    /// Settings of a subscription: unset fields take the defaults. Not
    /// validated; see [`SubscriptionSettings::validate`].
    fn try_from(s: &proto::Subscription) -> Result<Self> {
        let d = SubscriptionSettings::default();
        let get = |v: &Option<prost_types::Duration>, field: &str, default: Duration| {
            opt_duration(v.as_ref(), field).map(|v| v.unwrap_or(default))
        };
        Ok(SubscriptionSettings {
            ack_deadline: get(&s.ack_deadline, "ack_deadline", d.ack_deadline)?,
            max_attempts: if s.max_attempts == 0 {
                d.max_attempts
            } else {
                s.max_attempts
            },
            min_backoff: get(&s.min_backoff, "min_backoff", d.min_backoff)?,
            max_backoff: get(&s.max_backoff, "max_backoff", d.max_backoff)?,
            dead_letter_topic: opt_string(s.dead_letter_topic.clone()),
            ordered: s.ordered,
        })
    }
}

impl TryFrom<proto::Subscription> for Subscription {
    type Error = Error;

    fn try_from(s: proto::Subscription) -> Result<Self> {
        Ok(Subscription {
            settings: SubscriptionSettings::try_from(&s)?,
            created_at: micros_of(&required(s.create_time, "subscription.create_time")?),
            name: s.name,
            topic: s.topic,
        })
    }
}

impl TryFrom<proto::subscription::Start> for StartPosition {
    type Error = Error;

    fn try_from(s: proto::subscription::Start) -> Result<Self> {
        use proto::subscription::Start;
        Ok(match s {
            Start::StartTime(t) => StartPosition::Time(checked_time(&t, "start_time")?),
            Start::StartPosition(p) => match proto::StartPosition::try_from(p) {
                Ok(proto::StartPosition::Earliest) => StartPosition::Earliest,
                Ok(proto::StartPosition::Latest | proto::StartPosition::Unspecified) => {
                    StartPosition::Latest
                }
                Err(_) => return Err(invalid(format!("unknown start_position {p}"))),
            },
        })
    }
}

impl From<StartPosition> for proto::subscription::Start {
    fn from(s: StartPosition) -> Self {
        use proto::subscription::Start;
        match s {
            StartPosition::Earliest => Start::StartPosition(proto::StartPosition::Earliest as i32),
            StartPosition::Latest => Start::StartPosition(proto::StartPosition::Latest as i32),
            StartPosition::Time(t) => Start::StartTime(timestamp(t)),
        }
    }
}

impl TryFrom<proto::Subscription> for NewSubscription {
    type Error = Error;

    /// A subscription to create: unset settings take the defaults, no start
    /// means the latest message. Not validated.
    fn try_from(s: proto::Subscription) -> Result<Self> {
        Ok(NewSubscription {
            settings: SubscriptionSettings::try_from(&s)?,
            start: s
                .start
                .map(StartPosition::try_from)
                .transpose()?
                .unwrap_or_default(),
            name: s.name,
            topic: s.topic,
        })
    }
}

impl From<NewSubscription> for proto::Subscription {
    fn from(s: NewSubscription) -> Self {
        proto::Subscription {
            start: Some(s.start.into()),
            ..settings_to_proto(s.name, s.topic, s.settings)
        }
    }
}

/// The subscription name and the masked fields of an UpdateSubscription
/// request; fields outside the mask stay `None`.
///
/// Fails with `InvalidArgument` if the subscription or the mask is missing,
/// a masked duration is unset, or the mask names a field that cannot be
/// updated.
pub fn subscription_update(
    r: proto::UpdateSubscriptionRequest,
) -> Result<(String, SubscriptionPatch)> {
    let s = required(r.subscription, "subscription")?;
    let given = |v: &Option<prost_types::Duration>, field: &str| {
        opt_duration(v.as_ref(), field)?
            .ok_or_else(|| invalid(format!("{field} is in the update mask but not set")))
    };
    let mut patch = SubscriptionPatch::default();
    each_masked(r.update_mask, "subscription", |path| {
        match path {
            "ack_deadline" => patch.ack_deadline = Some(given(&s.ack_deadline, "ack_deadline")?),
            "max_attempts" => patch.max_attempts = Some(s.max_attempts),
            "min_backoff" => patch.min_backoff = Some(given(&s.min_backoff, "min_backoff")?),
            "max_backoff" => patch.max_backoff = Some(given(&s.max_backoff, "max_backoff")?),
            "dead_letter_topic" => {
                patch.dead_letter_topic = Some(opt_string(s.dead_letter_topic.clone()))
            }
            "ordered" => patch.ordered = Some(s.ordered),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((s.name, patch))
}

impl From<(String, SubscriptionPatch)> for proto::UpdateSubscriptionRequest {
    /// An UpdateSubscription request whose mask names the fields the patch
    /// sets.
    fn from((name, patch): (String, SubscriptionPatch)) -> Self {
        let update_mask = mask(&[
            (patch.ack_deadline.is_some(), "ack_deadline"),
            (patch.max_attempts.is_some(), "max_attempts"),
            (patch.min_backoff.is_some(), "min_backoff"),
            (patch.max_backoff.is_some(), "max_backoff"),
            (patch.dead_letter_topic.is_some(), "dead_letter_topic"),
            (patch.ordered.is_some(), "ordered"),
        ]);
        proto::UpdateSubscriptionRequest {
            subscription: Some(proto::Subscription {
                name,
                ack_deadline: patch.ack_deadline.map(duration),
                max_attempts: patch.max_attempts.unwrap_or_default(),
                min_backoff: patch.min_backoff.map(duration),
                max_backoff: patch.max_backoff.map(duration),
                dead_letter_topic: patch.dead_letter_topic.flatten().unwrap_or_default(),
                ordered: patch.ordered.unwrap_or_default(),
                ..Default::default()
            }),
            update_mask: Some(update_mask),
        }
    }
}

impl From<(String, SubscriptionStats)> for proto::SubscriptionStats {
    /// The stats of the subscription named first.
    fn from((subscription, s): (String, SubscriptionStats)) -> Self {
        proto::SubscriptionStats {
            subscription,
            backlog: s.backlog,
            in_flight: s.in_flight,
            oldest_unacked_age: s.oldest_unacked_age.map(duration),
            dead_lettered: s.dead_lettered,
            delivered: s.delivered,
            acked: s.acked,
            redelivered: s.redelivered,
            blocked_keys: s.blocked_keys,
            blocked_key_sample: s.blocked_key_sample,
            ack_watermark: s.ack_watermark,
        }
    }
}

impl TryFrom<proto::SubscriptionStats> for SubscriptionStats {
    type Error = Error;

    fn try_from(s: proto::SubscriptionStats) -> Result<Self> {
        Ok(SubscriptionStats {
            backlog: s.backlog,
            in_flight: s.in_flight,
            oldest_unacked_age: opt_duration(
                s.oldest_unacked_age.as_ref(),
                "stats.oldest_unacked_age",
            )?,
            dead_lettered: s.dead_lettered,
            delivered: s.delivered,
            acked: s.acked,
            redelivered: s.redelivered,
            blocked_keys: s.blocked_keys,
            blocked_key_sample: s.blocked_key_sample,
            ack_watermark: s.ack_watermark,
        })
    }
}

impl From<DeadLetter> for proto::DeadLetter {
    fn from(d: DeadLetter) -> Self {
        proto::DeadLetter {
            message: Some(d.message.into()),
            attempts: d.attempts,
            first_delivery_time: d.first_delivery_at.map(timestamp),
            last_delivery_time: d.last_delivery_at.map(timestamp),
            last_failure_reason: d.reason,
            dead_letter_time: Some(timestamp(d.dead_lettered_at)),
        }
    }
}

impl TryFrom<proto::DeadLetter> for DeadLetter {
    type Error = Error;

    fn try_from(d: proto::DeadLetter) -> Result<Self> {
        Ok(DeadLetter {
            message: required(d.message, "dead_letter.message")?.try_into()?,
            attempts: d.attempts,
            first_delivery_at: d.first_delivery_time.as_ref().map(micros_of),
            last_delivery_at: d.last_delivery_time.as_ref().map(micros_of),
            reason: d.last_failure_reason,
            dead_lettered_at: micros_of(&required(
                d.dead_letter_time,
                "dead_letter.dead_letter_time",
            )?),
        })
    }
}

impl From<MessageState> for proto::MessageState {
    fn from(s: MessageState) -> Self {
        match s {
            MessageState::New => proto::MessageState::New,
            MessageState::Ready => proto::MessageState::Ready,
            MessageState::Backoff => proto::MessageState::Backoff,
            MessageState::Leased => proto::MessageState::Leased,
            MessageState::Held => proto::MessageState::Held,
        }
    }
}

impl From<PeekedMessage> for proto::PeekedMessage {
    fn from(p: PeekedMessage) -> Self {
        proto::PeekedMessage {
            message: Some(p.message.into()),
            state: proto::MessageState::from(p.state) as i32,
            attempts: p.attempts,
            available_time: p.available_at.map(timestamp),
            last_failure_reason: p.reason,
        }
    }
}

impl TryFrom<proto::PeekedMessage> for PeekedMessage {
    type Error = Error;

    fn try_from(p: proto::PeekedMessage) -> Result<Self> {
        let state = match proto::MessageState::try_from(p.state) {
            Ok(proto::MessageState::New) => MessageState::New,
            Ok(proto::MessageState::Ready) => MessageState::Ready,
            Ok(proto::MessageState::Backoff) => MessageState::Backoff,
            Ok(proto::MessageState::Leased) => MessageState::Leased,
            Ok(proto::MessageState::Held) => MessageState::Held,
            Ok(proto::MessageState::Unspecified) | Err(_) => {
                return Err(invalid(format!("unknown message state {}", p.state)));
            }
        };
        Ok(PeekedMessage {
            message: required(p.message, "peeked_message.message")?.try_into()?,
            state,
            attempts: p.attempts,
            available_at: p.available_time.as_ref().map(micros_of),
            reason: p.last_failure_reason,
        })
    }
}

impl TryFrom<Option<proto::seek_request::Target>> for SeekTarget {
    type Error = Error;

    /// Fails with `InvalidArgument` if there is no target.
    fn try_from(t: Option<proto::seek_request::Target>) -> Result<Self> {
        match t {
            Some(proto::seek_request::Target::Time(t)) => {
                Ok(SeekTarget::Time(checked_time(&t, "time")?))
            }
            Some(proto::seek_request::Target::Sequence(s)) if s < 0 => Err(invalid(format!(
                "sequence {s} is negative (sequences start at 1; 0 seeks to the beginning)"
            ))),
            Some(proto::seek_request::Target::Sequence(s)) => Ok(SeekTarget::Sequence(s)),
            None => Err(invalid("seek needs a time or a sequence")),
        }
    }
}

impl From<SeekTarget> for proto::seek_request::Target {
    fn from(t: SeekTarget) -> Self {
        match t {
            SeekTarget::Time(t) => proto::seek_request::Target::Time(timestamp(t)),
            SeekTarget::Sequence(s) => proto::seek_request::Target::Sequence(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for us in [0, 1, 1_500_000, -1, -1_500_001, 1_795_736_562_573_423] {
            assert_eq!(micros_of(&timestamp(us)), us);
        }
        // The extremes too: the seconds times a million leave i64 there.
        for us in [
            i64::MIN,
            i64::MIN + 1,
            i64::MIN + 999_999,
            i64::MAX,
            i64::MAX - 1,
        ] {
            assert_eq!(micros_of(&timestamp(us)), us, "{us}");
        }
        let far = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(micros_of(&far), i64::MAX, "saturates");
        let before = prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: 0,
        };
        assert_eq!(micros_of(&before), i64::MIN, "saturates");
    }

    #[test]
    fn subscription_patch_round_trips_with_only_its_fields_masked() {
        let patch = SubscriptionPatch {
            max_attempts: Some(3),
            dead_letter_topic: Some(None),
            ..Default::default()
        };
        let request = proto::UpdateSubscriptionRequest::from(("s".to_string(), patch.clone()));
        assert_eq!(
            request.update_mask.as_ref().map(|m| m.paths.clone()),
            Some(vec!["max_attempts".into(), "dead_letter_topic".into()])
        );
        assert_eq!(subscription_update(request).unwrap(), ("s".into(), patch));
    }

    #[test]
    fn delivery_round_trips() {
        let d = Delivery {
            message: StoredMessage {
                id: uuid::Uuid::now_v7(),
                topic: "t".into(),
                key: Some("k".into()),
                payload: b"x".to_vec(),
                attributes: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
                created_at: Some(5),
                sequence: 9,
                published_at: 7,
            },
            ack_id: AckId {
                subscription: 1,
                sequence: 9,
                token: -3,
                deadline: Some(11),
            },
            attempt: 2,
            lease_deadline: 11,
        };
        let wire = proto::ReceivedMessage::from(d.clone());
        assert_eq!(Delivery::try_from(wire).unwrap(), d);
    }
}
