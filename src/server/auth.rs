//! Who is calling and what they may do.
//!
//! Off unless an access file is given (`--access-file`). Then every call but
//! health (and reflection, if left public) must name a principal: by a
//! bearer token (`authorization: Bearer …`) whose SHA-256 the file lists, by
//! a JSON Web Token signed by one of the identity provider's keys the file
//! names (its `sub`, or another claim, is the principal's name), or by a
//! client certificate (mutual TLS) with a DNS name the file lists.
//! Rights are per principal: publish on topics, consume on subscriptions,
//! admin; names may be patterns with `*`. Everything not granted is denied.
//!
//! [`AuthLayer`] authenticates every call and checks the admin right of the
//! admin RPCs; the handlers check the rights that depend on the request's
//! content (the topics of a publish, the subscription of a consumer call)
//! with [`Caller::may`]. Admin changes are written to the log with who made
//! them (target `tidings::audit`).
//!
//! The file (JSON):
//!
//! ```json
//! {"principals": [
//!   {"name": "billing", "tokens": ["sha256:<hex>"], "certificates": ["billing.internal"],
//!    "publish": ["orders.*"], "consume": ["billing"], "admin": false}
//! ],
//!  "jwt": {"keys": ["idp-public.pem"], "issuer": "https://idp.example", "audience": "tidings",
//!          "principal_claim": "sub"}}
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde_json::Value;
use tonic::Status;
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic_types::{ErrorDetails, StatusExt};

use super::net::ConnInfo;
use super::reload::Reloading;
use crate::error::{Error, Result};

/// A right a principal may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permission {
    /// Publish to a topic.
    Publish,
    /// Receive, ack, nack, peek and read the stats of a subscription.
    Consume,
    /// Every admin RPC (and, with it, every other right).
    Admin,
}

impl Permission {
    fn name(self) -> &'static str {
        match self {
            Permission::Publish => "publish",
            Permission::Consume => "consume",
            Permission::Admin => "admin",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Permission::Publish => "topic",
            Permission::Consume => "subscription",
            Permission::Admin => "broker",
        }
    }
}

/// One principal's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    name: Arc<str>,
    publish: Vec<String>,
    consume: Vec<String>,
    admin: bool,
}

impl Grant {
    fn allows(&self, permission: Permission, resource: &str) -> bool {
        if self.admin {
            return true;
        }
        let patterns = match permission {
            Permission::Publish => &self.publish,
            Permission::Consume => &self.consume,
            Permission::Admin => return false,
        };
        patterns.iter().any(|p| matches(p, resource))
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (none included).
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return name.is_empty();
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: an exact name.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The access file, read.
#[derive(Default)]
struct Rules {
    grants: Vec<Arc<Grant>>,
    /// SHA-256 of a token → its principal's grant.
    tokens: HashMap<[u8; 32], usize>,
    /// A client certificate's DNS name → its principal's grant.
    certificates: HashMap<String, usize>,
    /// How JSON Web Tokens are checked, if they are accepted.
    jwt: Option<Jwt>,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("principals", &self.grants.len())
            .field("jwt", &self.jwt.as_ref().map(|j| j.keys.len()))
            .finish_non_exhaustive()
    }
}

/// JSON Web Tokens from an identity provider: its public keys (each with
/// the algorithms of its kind), the issuer and audience they must name, and
/// the claim that names the principal.
struct Jwt {
    keys: Vec<(jsonwebtoken::DecodingKey, Vec<jsonwebtoken::Algorithm>)>,
    issuer: Option<String>,
    audience: Option<String>,
    claim: String,
}

impl Jwt {
    fn read(value: &Value, path: &Path) -> Result<Jwt> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let text = |field: &str| -> Result<Option<String>> {
            match value.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad_file(path, format!("jwt.{field} must be a string"))),
            }
        };
        let mut keys = Vec::new();
        for file in strings(value, "keys", path, "jwt")? {
            // Relative to the access file.
            let key_path = base.join(&file);
            let pem = std::fs::read(&key_path)
                .map_err(|e| bad_file(path, format!("jwt key {}: {e}", key_path.display())))?;
            let key = if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, vec![Algorithm::ES256, Algorithm::ES384])
            } else if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                let rsa = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
                let pss = [Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];
                (k, rsa.into_iter().chain(pss).collect())
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (k, vec![Algorithm::EdDSA])
            } else {
                return Err(bad_file(
                    path,
                    format!(
                        "jwt key {} is not a PEM public key (EC, RSA or Ed25519)",
                        key_path.display()
                    ),
                ));
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(bad_file(path, "jwt.keys names no key"));
        }
        Ok(Jwt {
            keys,
            issuer: text("issuer")?,
            audience: text("audience")?,
            claim: text("principal_claim")?.unwrap_or_else(|| "sub".to_owned()),
        })
    }

    /// The principal name a token carries, if one of the keys signed it and
    /// it is in force (not expired, the right issuer and audience).
    fn principal(&self, token: &str) -> std::result::Result<String, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let mut last = "no key of the identity provider verifies it".to_owned();
        for (key, algorithms) in &self.keys {
            if !algorithms.contains(&header.alg) {
                continue;
            }
            let mut validation = jsonwebtoken::Validation::new(header.alg);
            validation.algorithms = algorithms.clone();
            match &self.issuer {
                Some(i) => validation.set_issuer(&[i]),
                None => validation.iss = None,
            }
            match &self.audience {
                Some(a) => validation.set_audience(&[a]),
                None => validation.validate_aud = false,
            }
            match jsonwebtoken::decode::<Value>(token, key, &validation) {
                Ok(data) => {
                    return data
                        .claims
                        .get(&self.claim)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("it has no {:?} claim", self.claim));
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

fn bad_file(path: &Path, what: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("access file {}: {what}", path.display()))
}

fn strings(principal: &Value, field: &str, path: &Path, name: &str) -> Result<Vec<String>> {
    match principal.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    bad_file(
                        path,
                        format!("principal {name:?}: {field} must be a list of strings"),
                    )
                })
            })
            .collect(),
        Some(_) => Err(bad_file(
            path,
            format!("principal {name:?}: {field} must be a list of strings"),
        )),
    }
}

/// Reads a `sha256:<64 hex digits>` token hash.
fn token_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    // Hex digits only: `from_str_radix` alone would also take a sign.
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Rules {
    fn read(path: &Path) -> Result<Rules> {
        let text = std::fs::read_to_string(path).map_err(|e| bad_file(path, e))?;
        Rules::parse(&text, path)
    }

    /// The rules a file's text states; `path` only names the file in
    /// errors.
    fn parse(text: &str, path: &Path) -> Result<Rules> {
        let value: Value = serde_json::from_str(text).map_err(|e| bad_file(path, e))?;
        let Some(principals) = value.get("principals").and_then(Value::as_array) else {
            return Err(bad_file(path, "no \"principals\" list"));
        };
        let mut rules = Rules::default();
        for p in principals {
            let Some(name) = p.get("name").and_then(Value::as_str) else {
                return Err(bad_file(path, "a principal has no \"name\""));
            };
            if rules.grants.iter().any(|g| &*g.name == name) {
                return Err(bad_file(
                    path,
                    format!("principal {name:?} is listed twice"),
                ));
            }
            let admin = match p.get("admin") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad_file(
                        path,
                        format!("principal {name:?}: admin must be true or false"),
                    ));
                }
            };
            let index = rules.grants.len();
            for token in strings(p, "tokens", path, name)? {
                let hash = token_hash(&token).ok_or_else(|| {
                    bad_file(
                        path,
                        format!(
                            "principal {name:?}: a token must be listed as sha256:<64 hex digits> \
                             (the SHA-256 of the token, never the token itself)"
                        ),
                    )
                })?;
                if rules.tokens.insert(hash, index).is_some() {
                    return Err(bad_file(
                        path,
                        format!("principal {name:?}: a token hash is listed twice"),
                    ));
                }
            }
            for dns in strings(p, "certificates", path, name)? {
                if rules
                    .certificates
                    .insert(dns.to_ascii_lowercase(), index)
                    .is_some()
                {
                    return Err(bad_file(
                        path,
                        format!("certificate name {dns:?} is listed twice"),
                    ));
                }
            }
            rules.grants.push(Arc::new(Grant {
                name: name.into(),
                publish: strings(p, "publish", path, name)?,
                consume: strings(p, "consume", path, name)?,
                admin,
            }));
        }
        if let Some(jwt) = value.get("jwt") {
            rules.jwt = Some(Jwt::read(jwt, path)?);
        }
        Ok(rules)
    }
}

/// One principal of an access file as read, for the fuzz targets.
#[cfg(feature = "fuzzing")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadPrincipal {
    pub(crate) name: String,
    pub(crate) tokens: Vec<[u8; 32]>,
    pub(crate) certificates: Vec<String>,
    pub(crate) publish: Vec<String>,
    pub(crate) consume: Vec<String>,
    pub(crate) admin: bool,
}

/// An access file's text read as `--access-file` reads it, laid out per
/// principal (tokens and certificate names sorted), for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn read_principals(text: &str) -> Result<Vec<ReadPrincipal>> {
    let rules = Rules::parse(text, Path::new("<fuzz>"))?;
    let mut out: Vec<ReadPrincipal> = rules
        .grants
        .iter()
        .map(|g| ReadPrincipal {
            name: g.name.to_string(),
            tokens: Vec::new(),
            certificates: Vec::new(),
            publish: g.publish.clone(),
            consume: g.consume.clone(),
            admin: g.admin,
        })
        .collect();
    for (hash, &i) in &rules.tokens {
        out[i].tokens.push(*hash);
    }
    for (name, &i) in &rules.certificates {
        out[i].certificates.push(name.clone());
    }
    for p in &mut out {
        p.tokens.sort();
        p.certificates.sort();
    }
    Ok(out)
}

/// The access rules in force, reread when their file changes.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    rules: Arc<Reloading<Rules>>,
    /// Whether reflection answers without credentials.
    public_reflection: bool,
}

impl Access {
    /// Reads the access file.
    ///
    /// Fails with `InvalidArgument` naming what is wrong in it.
    pub(crate) fn load(path: &Path, public_reflection: bool) -> Result<Access> {
        let file = path.to_owned();
        let rules = Reloading::new("access file", vec![file.clone()], move || {
            Rules::read(&file)
        })?;
        Ok(Access {
            rules: Arc::new(rules),
            public_reflection,
        })
    }

    /// Rereads the file if it changed; a file that does not load keeps the
    /// rules in force, and is logged.
    pub(crate) fn reload_if_changed(&self) {
        self.rules.reload_if_changed();
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.get()
    }

    /// Who is calling, from the request's token or client certificate.
    fn authenticate(&self, headers: &HeaderMap, conn: Option<&ConnInfo>) -> Result<Caller, Status> {
        let rules = self.rules();
        if let Some(value) = headers.get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .ok_or_else(|| {
                    unauthenticated("the authorization header is not `Bearer <token>`")
                })?;
            let token = token.trim();
            if let Some(&i) = rules.tokens.get(&sha256(token.as_bytes())) {
                return Ok(Caller::principal(&rules, i));
            }
            // A JSON Web Token has three dot-separated parts.
            return match (&rules.jwt, token.matches('.').count()) {
                (Some(jwt), 2) => match jwt.principal(token) {
                    Ok(name) => rules
                        .grants
                        .iter()
                        .position(|g| *g.name == name)
                        .map(|i| Caller::principal(&rules, i))
                        .ok_or_else(|| {
                            unauthenticated(&format!(
                                "the token's principal {name:?} is not in this broker's access file"
                            ))
                        }),
                    Err(why) => Err(unauthenticated(&format!(
                        "the JSON Web Token is not accepted: {why}"
                    ))),
                },
                _ => Err(unauthenticated(
                    "the bearer token is not known to this broker",
                )),
            };
        }
        if let Some(first) = conn
            .and_then(|c| c.peer_certs.as_ref())
            .and_then(|c| c.first())
        {
            let names = certificate_names(first);
            return names
                .iter()
                .find_map(|n| rules.certificates.get(&n.to_ascii_lowercase()))
                .map(|&i| Caller::principal(&rules, i))
                .ok_or_else(|| {
                    unauthenticated(&format!(
                        "the client certificate's DNS names ({}) name no principal of this broker",
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ))
                });
        }
        Err(unauthenticated(
            "credentials required: a bearer token (authorization: Bearer <token>, `--token`) \
             or a client certificate",
        ))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The DNS names in a certificate's subject alternative names.
fn certificate_names(cert: &rustls::pki_types::CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(parsed) => parsed.valid_dns_names().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

fn unauthenticated(message: &str) -> Status {
    let details = ErrorDetails::with_error_info("UNAUTHENTICATED", "tidings.v1", HashMap::new());
    Status::with_error_details(tonic::Code::Unauthenticated, message, details)
}

/// The principal of a call, in its request's extensions.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// Access control is off.
    Anyone,
    /// A principal of the access file.
    Principal(Arc<Grant>),
}

impl Caller {
    fn principal(rules: &Rules, index: usize) -> Caller {
        Caller::Principal(rules.grants[index].clone())
    }

    /// The caller of `request` (anyone if access control is off).
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anyone)
    }

    /// Who, for the audit log.
    pub(crate) fn name(&self) -> &str {
        match self {
            Caller::Anyone => "anyone (access control off)",
            Caller::Principal(g) => &g.name,
        }
    }

    /// Succeeds if the caller holds `permission` on `resource`.
    ///
    /// Fails with `PERMISSION_DENIED` naming the principal, the right and
    /// the resource (also in the status's `ErrorInfo`).
    pub(crate) fn may(&self, permission: Permission, resource: &str) -> Result<(), Status> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Principal(g) if g.allows(permission, resource) => Ok(()),
            Caller::Principal(g) => {
                let metadata = HashMap::from([
                    ("principal".to_owned(), g.name.to_string()),
                    ("permission".to_owned(), permission.name().to_owned()),
                    ("resource".to_owned(), resource.to_owned()),
                ]);
                let details =
                    ErrorDetails::with_error_info("PERMISSION_DENIED", "tidings.v1", metadata);
                let message = match permission {
                    Permission::Admin => format!("principal {:?} has no admin right", g.name),
                    p => format!(
                        "principal {:?} may not {} on {} {resource:?}",
                        g.name,
                        p.name(),
                        p.noun()
                    ),
                };
                Err(Status::with_error_details(
                    tonic::Code::PermissionDenied,
                    message,
                    details,
                ))
            }
        }
    }

    /// Succeeds if the caller may publish to every topic of `messages`.
    ///
    /// Fails as [`Caller::may`] does, for the first topic refused.
    pub(crate) fn may_publish(&self, messages: &[crate::proto::Message]) -> Result<(), Status> {
        for m in messages {
            self.may(Permission::Publish, &m.topic)?;
        }
        Ok(())
    }

    /// Logs an admin change and its outcome, with who made it.
    pub(crate) fn audit<T>(&self, action: &str, resource: &str, outcome: &Result<T, Status>) {
        match outcome {
            Ok(_) => {
                tracing::info!(target: "tidings::audit", principal = self.name(), action, resource, "admin change")
            }
            Err(s) => tracing::info!(
                target: "tidings::audit",
                principal = self.name(),
                action,
                resource,
                refused = %s.message(),
                "admin change refused"
            ),
        }
    }
}

/// The admin RPCs whose right depends on the request (the handler checks
/// it): a consumer may read its own subscription's stats.
const CHECKED_BY_HANDLER: &[&str] = &["/tidings.v1.AdminService/GetSubscriptionStats"];

/// Authenticates every call (health always open; reflection unless told
/// otherwise), puts its [`Caller`] in the request's extensions, and checks
/// the admin right of the admin RPCs.
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer(pub(crate) Option<Access>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            access: self.0.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    access: Option<Access>,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(access) = &self.access else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path();
        let open = path.starts_with("/grpc.health.v1.Health/")
            || (access.public_reflection && path.starts_with("/grpc.reflection."));
        if open {
            return Box::pin(self.inner.call(request));
        }
        let caller = access.authenticate(request.headers(), request.extensions().get::<ConnInfo>());
        let admin = path.starts_with("/tidings.v1.AdminService/");
        let checked = caller.and_then(|c| {
            if admin && !CHECKED_BY_HANDLER.contains(&path) {
                c.may(Permission::Admin, "")?;
            }
            Ok(c)
        });
        if admin && let Err(refused) = &checked {
            tracing::info!(
                target: "tidings::audit",
                method = path,
                refused = %refused.message(),
                "admin call refused"
            );
        }
        match checked {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_with_stars() {
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders.created"));
        assert!(matches("orders.*", "orders.created"));
        assert!(matches("orders.*", "orders."));
        assert!(!matches("orders.*", "orders"));
        assert!(!matches("orders.*", "billing"));
        assert!(matches("*", "anything"));
        assert!(matches("*.dlq", "orders.dlq"));
        assert!(!matches("*.dlq", "orders.dlq.x"));
        assert!(matches("a*b*c", "aXbYc"));
        assert!(!matches("a*b*c", "aXc"));
        assert!(!matches("ab*ba", "aba"), "the two ends may not overlap");
    }

    #[test]
    fn token_hashes_are_sha256_in_hex() {
        let hash = sha256(b"secret");
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(token_hash(&format!("sha256:{hex}")), Some(hash));
        assert_eq!(token_hash("secret"), None);
        assert_eq!(token_hash("sha256:abc"), None);
        assert_eq!(token_hash(&format!("sha256:{}", "zz".repeat(32))), None);
    }

    /// Issue 12, found by the access_file fuzz target: `+3` was read as the
    /// hex pair `03`, so a malformed hash was accepted as another one.
    #[test]
    fn token_hashes_with_a_sign_are_refused() {
        let hex = format!("+3{}", "0".repeat(62));
        assert_eq!(token_hash(&format!("sha256:{hex}")), None);
        let upper = "AB".repeat(32);
        assert_eq!(token_hash(&format!("sha256:{upper}")), Some([0xab; 32]));
    }

    #[test]
    fn admins_may_do_anything_and_others_only_what_they_are_granted() {
        let g = Grant {
            name: "billing".into(),
            publish: vec!["orders.*".into()],
            consume: vec!["billing".into()],
            admin: false,
        };
        assert!(g.allows(Permission::Publish, "orders.created"));
        assert!(!g.allows(Permission::Publish, "billing"));
        assert!(g.allows(Permission::Consume, "billing"));
        assert!(!g.allows(Permission::Consume, "shipping"));
        assert!(!g.allows(Permission::Admin, ""));
        let admin = Grant { admin: true, ..g };
        assert!(admin.allows(Permission::Publish, "billing"));
        assert!(admin.allows(Permission::Admin, ""));
    }
}
