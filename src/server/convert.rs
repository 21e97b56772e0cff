//! The one place where domain errors become gRPC statuses. Protobuf ↔
//! domain conversions are in `crate::wire`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

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

/// A request a stream could not read, answered for what it is: one that
/// does not decode (tonic says `INTERNAL`) is `INVALID_ARGUMENT`; one over
/// the size limit keeps `OUT_OF_RANGE`; a broken transport keeps its code.
pub(crate) fn unreadable(s: Status) -> Status {
    match s.code() {
        Code::Internal | Code::Unknown => Status::invalid_argument(s.message().to_owned()),
        _ => s,
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> Status {
    status(Error::InvalidArgument(message.into()))
}
