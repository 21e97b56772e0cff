//! What the client commands print: text for people, or JSON objects whose
//! field names and value forms follow the `tidings.v1` proto's JSON mapping
//! (lowerCamelCase names, durations like `"10s"`, timestamps in RFC 3339,
//! bytes in base64), so scripts can rely on them. Integers are JSON numbers.

use std::time::Duration;

use clap::ValueEnum;
use serde_json::{Map, Value, json};
use tidings::model::{
    DeadLetter, Delivery, MessageState, Micros, PeekedMessage, PublishOutcome, StoredMessage,
    Subscription, SubscriptionStats, Topic,
};

/// The output format (`--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Lines for people.
    Text,
    /// One JSON object per line (a listing is one object with an array).
    Json,
}

/// Prints one JSON value on its own line.
pub(crate) fn print_json(value: &Value) {
    println!("{value}");
}

/// A duration as the proto JSON mapping writes it: `"600s"`, `"0.250s"`.
pub(crate) fn proto_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}.{:03}s", d.as_secs(), nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{}.{:06}s", d.as_secs(), nanos / 1_000)
    } else {
        format!("{}.{:09}s", d.as_secs(), nanos)
    }
}

/// A duration for people, as flags are written (`10m`), or "none" for zero
/// (a setting that is off).
pub(crate) fn human_duration(d: Duration) -> String {
    if d.is_zero() {
        "none".into()
    } else {
        tidings::config::format_duration(d)
    }
}

/// The days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a count of days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// An instant (microseconds since the Unix epoch) in RFC 3339, UTC:
/// `2024-05-01T12:00:00.123456Z`.
pub(crate) fn rfc3339(us: Micros) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let (hh, mm, ss) = (s / 3600, s % 3600 / 60, s % 60);
    if micros == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{micros:06}Z")
    }
}

/// Parses a time given on the command line: Unix seconds (`1714564800`) or
/// RFC 3339 (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`, fractions
/// allowed). Returns microseconds since the Unix epoch.
pub(crate) fn parse_time(text: &str) -> Result<Micros, String> {
    let bad = || {
        format!(
            "{text:?} is not a time; use Unix seconds (1714564800) or RFC 3339 (2024-05-01T12:00:00Z)"
        )
    };
    if let Ok(secs) = text.parse::<i64>() {
        return secs.checked_mul(1_000_000).ok_or_else(bad);
    }
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(range)
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let mut rest = &text[19..];
    let mut micros = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let mut place = 100_000i64;
        for c in fraction[..digits].bytes().take(6) {
            micros += i64::from(c - b'0') * place;
            place /= 10;
        }
        rest = &fraction[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let oh = num(text.len() - 5..text.len() - 3)?;
            let om = num(text.len() - 2..text.len())?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return Err(bad()),
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Ok(secs * 1_000_000 + micros)
}

/// Bytes in standard base64 with padding, as the proto JSON mapping writes
/// `bytes` fields.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A topic, as `tidings.v1.Topic` in JSON.
pub(crate) fn topic(t: &Topic) -> Value {
    json!({
        "name": t.name,
        "createTime": rfc3339(t.created_at),
        "retention": proto_duration(t.settings.retention),
        "maxAge": proto_duration(t.settings.max_age),
        "lastSequence": t.last_sequence,
        "expiredCount": t.expired_count,
    })
}

/// A subscription, as `tidings.v1.Subscription` in JSON.
pub(crate) fn subscription(s: &Subscription) -> Value {
    let c = &s.settings;
    json!({
        "name": s.name,
        "topic": s.topic,
        "ackDeadline": proto_duration(c.ack_deadline),
        "maxAttempts": c.max_attempts,
        "minBackoff": proto_duration(c.min_backoff),
        "maxBackoff": proto_duration(c.max_backoff),
        "deadLetterTopic": c.dead_letter_topic.as_deref().unwrap_or_default(),
        "ordered": c.ordered,
        "createTime": rfc3339(s.created_at),
    })
}

/// Stats, as `tidings.v1.SubscriptionStats` in JSON.
pub(crate) fn stats(name: &str, s: &SubscriptionStats) -> Value {
    let mut v = json!({
        "subscription": name,
        "backlog": s.backlog,
        "inFlight": s.in_flight,
        "deadLettered": s.dead_lettered,
        "delivered": s.delivered,
        "acked": s.acked,
        "redelivered": s.redelivered,
        "blockedKeys": s.blocked_keys,
        "blockedKeySample": s.blocked_key_sample,
        "ackWatermark": s.ack_watermark,
    });
    if let (Some(age), Value::Object(map)) = (s.oldest_unacked_age, &mut v) {
        map.insert("oldestUnackedAge".into(), proto_duration(age).into());
    }
    v
}

/// A message, as `tidings.v1.Message` in JSON, plus `payloadText` (the
/// payload as UTF-8) when it is text.
pub(crate) fn message(m: &StoredMessage) -> Value {
    let mut map = Map::new();
    map.insert("id".into(), m.id.to_string().into());
    map.insert("topic".into(), m.topic.clone().into());
    if let Some(key) = &m.key {
        map.insert("key".into(), key.clone().into());
    }
    map.insert("payload".into(), base64(&m.payload).into());
    if let Ok(text) = std::str::from_utf8(&m.payload) {
        map.insert("payloadText".into(), text.into());
    }
    let attributes: Map<String, Value> = m
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    map.insert("attributes".into(), attributes.into());
    if let Some(created) = m.created_at {
        map.insert("createTime".into(), rfc3339(created).into());
    }
    map.insert("sequence".into(), m.sequence.into());
    map.insert("publishTime".into(), rfc3339(m.published_at).into());
    map.into()
}

/// A delivery, as `tidings.v1.ReceivedMessage` in JSON.
pub(crate) fn delivery(d: &Delivery) -> Value {
    json!({
        "message": message(&d.message),
        "ackId": d.ack_id.to_string(),
        "attempt": d.attempt,
        "leaseDeadline": rfc3339(d.lease_deadline),
    })
}

/// A dead letter, as `tidings.v1.DeadLetter` in JSON.
pub(crate) fn dead_letter(d: &DeadLetter) -> Value {
    let mut map = Map::new();
    map.insert("message".into(), message(&d.message));
    map.insert("attempts".into(), d.attempts.into());
    if let Some(t) = d.first_delivery_at {
        map.insert("firstDeliveryTime".into(), rfc3339(t).into());
    }
    if let Some(t) = d.last_delivery_at {
        map.insert("lastDeliveryTime".into(), rfc3339(t).into());
    }
    map.insert("lastFailureReason".into(), d.reason.clone().into());
    map.insert("deadLetterTime".into(), rfc3339(d.dead_lettered_at).into());
    map.into()
}

/// A message state as the user reads it.
pub(crate) fn state_name(s: MessageState) -> &'static str {
    match s {
        MessageState::New => "new",
        MessageState::Ready => "ready",
        MessageState::Backoff => "backoff",
        MessageState::Leased => "leased",
        MessageState::Held => "held",
    }
}

/// A waiting message, as `tidings.v1.PeekedMessage` in JSON.
pub(crate) fn peeked(p: &PeekedMessage) -> Value {
    let state = match p.state {
        MessageState::New => "MESSAGE_STATE_NEW",
        MessageState::Ready => "MESSAGE_STATE_READY",
        MessageState::Backoff => "MESSAGE_STATE_BACKOFF",
        MessageState::Leased => "MESSAGE_STATE_LEASED",
        MessageState::Held => "MESSAGE_STATE_HELD",
    };
    let mut map = Map::new();
    map.insert("message".into(), message(&p.message));
    map.insert("state".into(), state.into());
    map.insert("attempts".into(), p.attempts.into());
    if let Some(t) = p.available_at {
        map.insert("availableTime".into(), rfc3339(t).into());
    }
    map.insert("lastFailureReason".into(), p.reason.clone().into());
    map.into()
}

/// A publish result, as `tidings.v1.PublishResult` in JSON.
pub(crate) fn publish_result(r: &PublishOutcome) -> Value {
    json!({
        "id": r.id.to_string(),
        "sequence": r.sequence,
        "duplicate": r.duplicate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_through_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_714_564_800_000_001),
            "2024-05-01T12:00:00.000001Z"
        );
        for us in [0, 1_714_564_800_000_001, 951_782_400_000_000, -1_000_000] {
            assert_eq!(parse_time(&rfc3339(us)), Ok(us));
        }
        assert_eq!(
            parse_time("2024-05-01T14:00:00+02:00"),
            parse_time("2024-05-01T12:00:00Z")
        );
        assert_eq!(parse_time("1714564800"), Ok(1_714_564_800_000_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2024-13-01T00:00:00Z").is_err());
    }

    #[test]
    fn durations_and_bytes_follow_the_json_mapping() {
        assert_eq!(proto_duration(Duration::from_secs(600)), "600s");
        assert_eq!(proto_duration(Duration::from_millis(250)), "0.250s");
        assert_eq!(human_duration(Duration::ZERO), "none");
        assert_eq!(human_duration(Duration::from_secs(600)), "10m");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
