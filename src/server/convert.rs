//! Conversions between `tidings.v1` protobuf types and the domain, and the
//! one place where domain errors become gRPC statuses.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;
use crate::model::{
    self, AckStatus, DeadLetter, Delivery, Micros, NewMessage, StartPosition, StoredMessage,
    Subscription, SubscriptionSettings, SubscriptionStats, Topic, TopicSettings,
};
use crate::proto::{self, duration};

/// Maps a domain error to a status. User errors keep their message; storage
/// errors are logged here and shown as an opaque internal error.
pub(crate) fn status(e: Error) -> Status {
    let (code, reason) = match &e {
        Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        Error::NotFound(_) => (Code::NotFound, "NOT_FOUND"),
        Error::AlreadyExists(_) => (Code::AlreadyExists, "ALREADY_EXISTS"),
        Error::FailedPrecondition(_) => (Code::FailedPrecondition, "FAILED_PRECONDITION"),
        Error::ResourceExhausted(_) => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
        Error::Unavailable(_) => (Code::Unavailable, "UNAVAILABLE"),
        Error::Storage(m) => {
            tracing::error!(error = %m, "storage error");
            return Status::internal("internal storage error; the broker's log has the details");
        }
    };
    let details =
        ErrorDetails::with_error_info(reason, "tidings.v1", std::collections::HashMap::new());
    Status::with_error_details(code, e.to_string(), details)
}

pub(crate) fn invalid(message: impl Into<String>) -> Status {
    status(Error::InvalidArgument(message.into()))
}

pub(crate) fn timestamp(us: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub(crate) fn micros_of(t: &prost_types::Timestamp) -> Micros {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

/// A protobuf duration as a std one; `field` names it in the error.
pub(crate) fn std_duration(d: &prost_types::Duration, field: &str) -> Result<Duration, Status> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(invalid(format!("{field} must be a non-negative duration")));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Checks and converts one message of a publish request; `at` is its index.
pub(crate) fn new_message(m: proto::Message, at: usize) -> Result<NewMessage, Status> {
    let id = model::parse_message_id(&m.id).map_err(|e| invalid(format!("message {at}: {e}")))?;
    model::validate_name("topic", &m.topic).map_err(|e| invalid(format!("message {at}: {e}")))?;
    let mut attributes: Vec<(String, String)> = m.attributes.into_iter().collect();
    attributes.sort();
    Ok(NewMessage {
        id,
        topic: m.topic,
        key: (!m.key.is_empty()).then_some(m.key),
        payload: m.payload,
        attributes,
        created_at: m.create_time.as_ref().map(micros_of),
    })
}

pub(crate) fn new_messages(messages: Vec<proto::Message>) -> Result<Vec<NewMessage>, Status> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| new_message(m, i))
        .collect()
}

pub(crate) fn message(m: StoredMessage) -> proto::Message {
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

pub(crate) fn received(d: Delivery) -> proto::ReceivedMessage {
    proto::ReceivedMessage {
        ack_id: d.ack_id.to_string(),
        attempt: d.attempt,
        lease_deadline: Some(timestamp(d.lease_deadline)),
        message: Some(message(d.message)),
    }
}

pub(crate) fn outcome(
    ack_id: String,
    operation: proto::AckOperation,
    status: AckStatus,
) -> proto::AckOutcome {
    let (result, detail, deadline) = match status {
        AckStatus::Ok(deadline) => (proto::AckResult::Ok, String::new(), deadline),
        AckStatus::Stale(d) => (proto::AckResult::Stale, d, None),
        AckStatus::Unknown(d) => (proto::AckResult::Unknown, d, None),
    };
    proto::AckOutcome {
        ack_id,
        operation: operation as i32,
        result: result as i32,
        lease_deadline: deadline.map(timestamp),
        detail,
    }
}

pub(crate) fn topic(t: Topic) -> proto::Topic {
    proto::Topic {
        name: t.name,
        create_time: Some(timestamp(t.created_at)),
        retention: Some(duration(t.settings.retention)),
        max_age: Some(duration(t.settings.max_age)),
        last_sequence: t.last_sequence,
        expired_count: t.expired_count,
    }
}

pub(crate) fn topic_settings(t: &proto::Topic) -> Result<TopicSettings, Status> {
    Ok(TopicSettings {
        retention: t
            .retention
            .as_ref()
            .map(|d| std_duration(d, "retention"))
            .transpose()?
            .unwrap_or_default(),
        max_age: t
            .max_age
            .as_ref()
            .map(|d| std_duration(d, "max_age"))
            .transpose()?
            .unwrap_or_default(),
    })
}

pub(crate) fn subscription(s: Subscription) -> proto::Subscription {
    proto::Subscription {
        name: s.name,
        topic: s.topic,
        ack_deadline: Some(duration(s.settings.ack_deadline)),
        max_attempts: s.settings.max_attempts,
        min_backoff: Some(duration(s.settings.min_backoff)),
        max_backoff: Some(duration(s.settings.max_backoff)),
        dead_letter_topic: s.settings.dead_letter_topic.unwrap_or_default(),
        ordered: s.settings.ordered,
        start: None,
        create_time: Some(timestamp(s.created_at)),
    }
}

/// Bounds of subscription settings, checked on create and update.
pub(crate) fn check_settings(s: &SubscriptionSettings) -> Result<(), Status> {
    if s.ack_deadline < Duration::from_millis(1) || s.ack_deadline > Duration::from_secs(12 * 3600)
    {
        return Err(invalid(format!(
            "ack_deadline {:?} is out of range (1 ms to 12 h)",
            s.ack_deadline
        )));
    }
    if !(1..=1000).contains(&s.max_attempts) {
        return Err(invalid(format!(
            "max_attempts {} is out of range (1 to 1000)",
            s.max_attempts
        )));
    }
    if s.min_backoff > s.max_backoff {
        return Err(invalid(format!(
            "min_backoff ({:?}) is longer than max_backoff ({:?})",
            s.min_backoff, s.max_backoff
        )));
    }
    if let Some(dlt) = &s.dead_letter_topic {
        model::validate_name("dead-letter topic", dlt).map_err(status)?;
    }
    Ok(())
}

/// Settings of a new subscription: unset fields take the defaults.
pub(crate) fn subscription_settings(
    s: &proto::Subscription,
) -> Result<SubscriptionSettings, Status> {
    let d = SubscriptionSettings::default();
    let get = |v: &Option<prost_types::Duration>, field: &str, default: Duration| {
        v.as_ref()
            .map(|v| std_duration(v, field))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let settings = SubscriptionSettings {
        ack_deadline: get(&s.ack_deadline, "ack_deadline", d.ack_deadline)?,
        max_attempts: if s.max_attempts == 0 {
            d.max_attempts
        } else {
            s.max_attempts
        },
        min_backoff: get(&s.min_backoff, "min_backoff", d.min_backoff)?,
        max_backoff: get(&s.max_backoff, "max_backoff", d.max_backoff)?,
        dead_letter_topic: (!s.dead_letter_topic.is_empty()).then(|| s.dead_letter_topic.clone()),
        ordered: s.ordered,
    };
    check_settings(&settings)?;
    Ok(settings)
}

pub(crate) fn start_position(s: &proto::Subscription) -> Result<StartPosition, Status> {
    use proto::subscription::Start;
    Ok(match &s.start {
        None => StartPosition::Latest,
        Some(Start::StartTime(t)) => StartPosition::Time(micros_of(t)),
        Some(Start::StartPosition(p)) => match proto::StartPosition::try_from(*p) {
            Ok(proto::StartPosition::Earliest) => StartPosition::Earliest,
            Ok(proto::StartPosition::Latest | proto::StartPosition::Unspecified) => {
                StartPosition::Latest
            }
            Err(_) => return Err(invalid(format!("unknown start_position {p}"))),
        },
    })
}

pub(crate) fn stats(name: String, s: SubscriptionStats) -> proto::SubscriptionStats {
    proto::SubscriptionStats {
        subscription: name,
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

pub(crate) fn dead_letter(d: DeadLetter) -> proto::DeadLetter {
    proto::DeadLetter {
        message: Some(message(d.message)),
        attempts: d.attempts,
        first_delivery_time: d.first_delivery_at.map(timestamp),
        last_delivery_time: d.last_delivery_at.map(timestamp),
        last_failure_reason: d.reason,
        dead_letter_time: Some(timestamp(d.dead_lettered_at)),
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
    }
}
