//! Entry points for the fuzz targets under `fuzz/`: the private parsers of
//! what comes off the network and out of files, reached without a broker, a
//! database or a file. Built only with the `fuzzing` feature and hidden from
//! the docs; not part of the API, and free to change with the parsers.

use std::collections::HashMap;

use crate::error::Result;

/// A page token of the listings, as `ListTopics` and `Peek` issue it.
pub fn encode_page_token(last: &str) -> String {
    crate::broker::encode_token(last)
}

/// A page token a client sent: `None` for the first page.
///
/// Fails with `InvalidArgument` for a token this server did not issue.
pub fn decode_page_token(token: &str) -> Result<Option<String>> {
    crate::broker::decode_token(token)
}

/// Message attributes as the broker's store writes them (`None` for none).
pub fn encode_stored_attributes(attributes: &[(String, String)]) -> Option<Vec<u8>> {
    crate::store::encode_attributes(attributes)
}

/// Message attributes as the broker's store reads them back.
///
/// Fails with `Storage` for bytes that are not such an encoding.
pub fn decode_stored_attributes(bytes: Option<Vec<u8>>) -> Result<Vec<(String, String)>> {
    crate::store::decode_attributes(bytes)
}

/// Message attributes as the outbox writes them into its row (JSON).
pub fn encode_outbox_attributes(attributes: &HashMap<String, String>) -> String {
    crate::outbox::encode_attributes(attributes)
}

/// Message attributes as the relay reads them from an outbox row, which
/// the application may have written by hand.
///
/// Fails with `InvalidArgument` for text that is not a JSON object or null.
pub fn decode_outbox_attributes(text: Option<&str>) -> Result<HashMap<String, String>> {
    crate::outbox::decode_attributes(0, text)
}

/// One principal of an access file, as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its name.
    pub name: String,
    /// The SHA-256 of each of its tokens, sorted.
    pub tokens: Vec<[u8; 32]>,
    /// Its client certificates' DNS names (lower case), sorted.
    pub certificates: Vec<String>,
    /// Topic patterns it may publish to.
    pub publish: Vec<String>,
    /// Subscription patterns it may consume from.
    pub consume: Vec<String>,
    /// Whether it holds every right.
    pub admin: bool,
}

/// The principals of an access file's text, as `--access-file` reads them.
///
/// Fails with `InvalidArgument` for a file the server would refuse.
pub fn read_access_file(text: &str) -> Result<Vec<Principal>> {
    Ok(crate::server::auth::read_principals(text)?
        .into_iter()
        .map(|p| Principal {
            name: p.name,
            tokens: p.tokens,
            certificates: p.certificates,
            publish: p.publish,
            consume: p.consume,
            admin: p.admin,
        })
        .collect())
}

/// Whether an access file's name pattern (`*` for any run of characters)
/// matches a topic or subscription name.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    crate::server::auth::matches(pattern, name)
}
