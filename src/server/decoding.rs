//! A request that is not a valid protobuf message answered as
//! `INVALID_ARGUMENT`.
//!
//! tonic answers a request body it cannot decode with `INTERNAL`, which
//! tells the client the broker failed when it was the request. [`answer`],
//! mapped over every response, rewrites that answer (a trailers-only
//! response whose `grpc-status` is 13 and whose message is prost's decode
//! error) to `INVALID_ARGUMENT`, keeping the message. Requests decoded later
//! on a stream are the handlers' to answer (see
//! [`super::convert::unreadable`]).

use tonic::codegen::http::{HeaderValue, Response};

/// The start of prost's decode errors, as tonic puts them in `grpc-message`
/// (percent-encoded).
const DECODE_ERROR: &str = "failed%20to%20decode%20Protobuf%20message";

/// `response`, with an undecodable request's `INTERNAL` made
/// `INVALID_ARGUMENT`.
pub(crate) fn answer(mut response: Response<tonic::body::Body>) -> Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let undecodable = headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.starts_with(DECODE_ERROR));
    if undecodable {
        headers.insert("grpc-status", HeaderValue::from_static("3"));
    }
    response
}
