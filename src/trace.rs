//! W3C trace context carried with each message, from the producer's span to
//! the consumer's handler.
//!
//! A message carries its producer's context in two attributes named like
//! the W3C Trace Context headers: [`TRACEPARENT`]
//! (`00-<trace id>-<parent span id>-<flags>`) and, when not empty,
//! [`TRACESTATE`]. [`crate::outbox::enqueue`] writes them from the current
//! `tracing` span when the application has the `tracing` ↔ OpenTelemetry
//! bridge (`tracing-opentelemetry`) installed and the message has no
//! `traceparent` yet; [`Outgoing::with_trace_context`] does the same for a
//! message published directly. The relay and the broker carry attributes
//! unchanged, so a re-sent outbox row is the same message; each of them
//! opens a `debug` span under the target `tidings::trace` whose parent is
//! the message's context (enabled only where asked for, so they cost
//! nothing otherwise), and the consumer runtime runs each handler in an
//! `info` span `tidings.handle` whose parent is the same context. One trace
//! then holds the producer's span, the relay's, the broker's and the
//! handler's.
//!
//! Without the `otel` feature the attributes are still parsed and carried,
//! but no span gets a parent from them.
//!
//! [`Outgoing::with_trace_context`]: crate::client::Outgoing::with_trace_context

use std::collections::HashMap;
use std::fmt;

/// The attribute holding a message's W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The attribute holding a message's W3C `tracestate`, when the producer's
/// context had one.
pub const TRACESTATE: &str = "tracestate";
/// The target of the relay's and the broker's per-message spans (level
/// `debug`): enable it for the layer that exports spans, e.g.
/// `tidings::trace=debug`.
pub const TARGET: &str = "tidings::trace";

/// A parsed W3C `traceparent` (version 00 fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The id of the span the message was sent from: 8 bytes, not all zero.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value as the W3C Trace Context specification
    /// reads it: lowercase hex, version `00` with exactly four fields, or a
    /// later version (not `ff`) whose first four fields are read. `None` for
    /// anything else, including all-zero ids: a malformed context is
    /// ignored, never an error, as the specification asks.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut fields = value.split('-');
        let version = fields.next()?;
        let trace_id = fields.next()?;
        let parent_id = fields.next()?;
        let flags = fields.next()?;
        let rest = fields.next();
        let version = hex::<1>(version)?[0];
        if version == 0xff || (version == 0 && rest.is_some()) {
            return None;
        }
        let trace_id = hex::<16>(trace_id)?;
        let parent_id = hex::<8>(parent_id)?;
        let flags = hex::<1>(flags)?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// Whether the sender sampled the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    /// The version 00 form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

/// Exactly `N` bytes from `2 * N` lowercase hex digits.
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The value of attribute `name` in a sorted or unsorted attribute list.
pub fn attribute<'a>(attributes: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The current `tracing` span's OpenTelemetry context as (`traceparent`,
/// `tracestate`), or `None` when there is no valid one (no span, or no
/// `tracing-opentelemetry` layer, or the feature `otel` is off).
pub fn current() -> Option<(String, Option<String>)> {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::Span::current();
        if span.is_none() {
            return None;
        }
        let context = span.context();
        let span_ref = context.span();
        let sc = span_ref.span_context();
        if !sc.is_valid() {
            return None;
        }
        let parent = TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        };
        let state = sc.trace_state().header();
        Some((parent.to_string(), (!state.is_empty()).then_some(state)))
    }
    #[cfg(not(feature = "otel"))]
    None
}

/// Adds the current span's context to `attributes` unless they carry a
/// `traceparent` already (the producer's own choice is kept). Returns
/// whether it added one.
pub fn inject_current(attributes: &mut HashMap<String, String>) -> bool {
    if attributes.contains_key(TRACEPARENT) {
        return false;
    }
    let Some((parent, state)) = current() else {
        return false;
    };
    attributes.insert(TRACEPARENT.to_string(), parent);
    if let Some(state) = state {
        attributes.insert(TRACESTATE.to_string(), state);
    }
    true
}

/// Makes the context in `traceparent` (and `tracestate`) the parent of
/// `span`. Does nothing for a disabled span, a missing or malformed
/// `traceparent`, or without the feature `otel`.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let Some(parent) = traceparent.and_then(TraceParent::parse) else {
        return;
    };
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.parent_id),
            TraceFlags::new(parent.flags),
            true,
            state,
        );
        let context = opentelemetry::Context::new().with_remote_span_context(context);
        // Fails only when no OpenTelemetry layer is installed: nothing to
        // parent then.
        let _ = span.set_parent(context);
    }
    #[cfg(not(feature = "otel"))]
    let _ = (parent, tracestate);
}

/// Makes the context carried in a message's attributes the parent of
/// `span` (see [`set_parent`]).
pub fn set_parent_from(span: &tracing::Span, attributes: &[(String, String)]) {
    if span.is_disabled() {
        return;
    }
    set_parent(
        span,
        attribute(attributes, TRACEPARENT),
        attribute(attributes, TRACESTATE),
    );
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// The relay's span for one message it publishes (`debug`, target
/// [`TARGET`]), a child of the message's context; disabled unless that
/// target is enabled, and then only for messages that carry a context.
pub(crate) fn relay_span(message: &crate::client::Outgoing) -> Option<tracing::Span> {
    let traceparent = message.attributes.get(TRACEPARENT)?;
    let span = tracing::debug_span!(
        target: "tidings::trace",
        "tidings.relay",
        otel.kind = "producer",
        message_id = %message.id,
        topic = %message.topic,
    );
    set_parent(
        &span,
        Some(traceparent),
        message.attributes.get(TRACESTATE).map(String::as_str),
    );
    (!span.is_disabled()).then_some(span)
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// The broker's spans for the messages of one publish that carry a context
/// (`debug`, target [`TARGET`]), each a child of its message's context;
/// none unless that target is enabled. They end when the caller drops them,
/// after the commit.
pub(crate) fn publish_spans(messages: &[crate::model::NewMessage]) -> Vec<tracing::Span> {
    if !tracing::enabled!(target: "tidings::trace", tracing::Level::DEBUG) {
        return Vec::new();
    }
    messages
        .iter()
        .filter(|m| attribute(&m.attributes, TRACEPARENT).is_some())
        .map(|m| {
            let span = tracing::debug_span!(
                target: "tidings::trace",
                "tidings.publish",
                otel.kind = "server",
                message_id = %m.id,
                topic = %m.topic,
            );
            set_parent_from(&span, &m.attributes);
            span
        })
        .collect()
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// The consumer runtime's span for one handler run (`info`), a child of the
/// delivered message's context.
pub(crate) fn handler_span(subscription: &str, delivery: &crate::model::Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "tidings.handle",
        otel.kind = "consumer",
        subscription = %subscription,
        message_id = %delivery.message.id,
        sequence = delivery.message.sequence,
        attempt = delivery.attempt,
    );
    set_parent_from(&span, &delivery.message.attributes);
    span
}

#[cfg(feature = "otlp")]
pub mod otlp;

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let p = TraceParent::parse(VALID).expect("valid");
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            p.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(p.sampled());
        assert_eq!(p.to_string(), VALID);
    }

    #[test]
    fn a_later_version_is_read_by_its_first_four_fields() {
        let p = TraceParent::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next",
        )
        .expect("a later version is accepted");
        assert!(!p.sampled());
        assert_eq!(
            p.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn without_a_current_span_nothing_is_injected() {
        let mut attributes = HashMap::new();
        assert!(!inject_current(&mut attributes));
        assert!(attributes.is_empty());
    }

    #[test]
    fn attribute_finds_by_name() {
        let attributes = vec![
            ("a".to_string(), "1".to_string()),
            (TRACEPARENT.to_string(), VALID.to_string()),
        ];
        assert_eq!(attribute(&attributes, TRACEPARENT), Some(VALID));
        assert_eq!(attribute(&attributes, TRACESTATE), None);
    }
}
