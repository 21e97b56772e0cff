//! The client's deadline (`grpc-timeout`) answered as `DEADLINE_EXCEEDED`.
//!
//! tonic's server enforces a call's `grpc-timeout` itself, but answers an
//! expired call with `CANCELLED`, which a client cannot tell from a call it
//! cancelled. This layer, inside tonic's, enforces the same deadline a
//! little earlier and answers `DEADLINE_EXCEEDED`, as the gRPC
//! specification asks. Like tonic's, it bounds the wait for a response's
//! headers; a streaming response, once started, runs on.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::Service;
use tonic::codegen::http::{HeaderMap, Request, Response};

/// How much earlier than the client's deadline this layer answers, so that
/// the answer reaches the client before its own timer fires: a tenth of
/// the deadline, at least 5 ms and at most 100 ms.
fn margin(deadline: Duration) -> Duration {
    (deadline / 10).clamp(Duration::from_millis(5), Duration::from_millis(100))
}

/// Adds [`Deadline`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// A service whose calls answer `DEADLINE_EXCEEDED` when the client's
/// `grpc-timeout` passes first.
#[derive(Debug, Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let deadline = grpc_timeout(request.headers());
        let response = self.inner.call(request);
        Box::pin(async move {
            let Some(deadline) = deadline else {
                return response.await;
            };
            match tokio::time::timeout(deadline.saturating_sub(margin(deadline)), response).await {
                Ok(answered) => answered,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call's deadline ({deadline:?}) passed before the broker answered; \
                     a publish or an ack may still commit: retrying is safe"
                ))
                .into_http()),
            }
        })
    }
}

/// The `grpc-timeout` header: at most 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`). A malformed one is ignored here (tonic's own layer
/// decides what it means).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().expect("header value"));
        grpc_timeout(&headers)
    }

    #[test]
    fn reads_every_unit_and_refuses_garbage() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
