//! A request that is not a valid protobuf message answered as
//! `INVALID_ARGUMENT`.
//!
//! tonic answers a request body it cannot decode with `INTERNAL`, which
//! tells the client the broker failed when it was the request. This layer
//! rewrites that answer (a trailers-only response whose `grpc-status` is
//! 13 and whose message is prost's decode error) to `INVALID_ARGUMENT`,
//! keeping the message. Requests decoded later on a stream are the
//! handlers' to answer (see [`super::convert::unreadable`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response};

/// The start of prost's decode errors, as tonic puts them in `grpc-message`
/// (percent-encoded).
const DECODE_ERROR: &str = "failed%20to%20decode%20Protobuf%20message";

/// Adds [`Decoding`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DecodingLayer;

impl<S> tower_layer::Layer<S> for DecodingLayer {
    type Service = Decoding<S>;

    fn layer(&self, inner: S) -> Decoding<S> {
        Decoding { inner }
    }
}

/// A service whose undecodable requests are answered `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub(crate) struct Decoding<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Decoding<S>
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
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let headers = response.headers_mut();
            let undecodable = headers.get("grpc-status").is_some_and(|s| s == "13")
                && headers
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .is_some_and(|m| m.starts_with(DECODE_ERROR));
            if undecodable {
                headers.insert("grpc-status", HeaderValue::from_static("3"));
            }
            Ok(response)
        })
    }
}
