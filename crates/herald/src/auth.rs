//! Who is calling: JWT verification pinned to the configured key type, the static publish keys, and
//! the rights a token's `herald` claim carries. HTTP handlers ask [`Auth`] for a [`Caller`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use herald_core::{Grant, Selector, Topic, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// How callers are checked. [`Auth::open`] (the default) checks nothing: herald as it was.
#[derive(Clone, Default)]
pub struct Auth {
    jwt: Option<Arc<Verifier>>,
    publish_keys: Vec<Arc<str>>,
    anonymous: bool,
    /// With publish keys and no JWT key: token-less subscribers may name any user and receive
    /// private events (`--open-subscribe`). Off, they are anonymous.
    open_subscribe: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Auth")
            .field("jwt", &self.jwt.as_ref().map(|v| v.algorithm))
            .field("publish_keys", &self.publish_keys.len())
            .field("anonymous", &self.anonymous)
            .field("open_subscribe", &self.open_subscribe)
            .finish()
    }
}

struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

/// What a token's issuer, audience and timing must satisfy.
#[derive(Debug, Clone, Default)]
pub struct JwtChecks {
    pub leeway: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{0} holds no RSA, EC (P-256) or Ed25519 public key in PEM form (-----BEGIN PUBLIC KEY-----)"
    )]
    NotAKey(String),
    #[error(
        "{0} holds a private key: give the public key (e.g. `openssl pkey -in {0} -pubout`); the private key stays with the token issuer"
    )]
    PrivateKey(String),
    #[error("the JWT secret must be at least 16 bytes")]
    ShortSecret,
}

/// The rights of a verified token.
#[derive(Debug, Clone)]
pub struct Token {
    pub user: Option<UserId>,
    pub subscribe: Vec<Selector>,
    pub publish: Vec<Selector>,
    pub admin: bool,
    /// `exp`, in ms since the epoch.
    pub expires_at_ms: Option<u64>,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No authorization is configured: everything is allowed.
    Open,
    /// Authorization is on and the request carries no credentials.
    Nobody,
    /// A static publish key (`Authorization: Bearer`), by its position in the configured list.
    PublishKey(usize),
    Token(Token),
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    herald: Rights,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Rights {
    subscribe: Vec<String>,
    publish: Vec<String>,
    admin: bool,
}

/// Why a caller is refused. The HTTP layer answers each with its error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials where they are needed, or a malformed `Authorization` header.
    #[error("{0}")]
    NoCredentials(String),
    /// A token that does not verify, has expired, or carries bad claims.
    #[error("{0}")]
    InvalidToken(String),
    /// Needs the publish key or an admin token.
    #[error("{0}")]
    NotAdmin(String),
    /// The token's publish rights do not cover a topic.
    #[error("{0}")]
    TopicNotCovered(String),
}

fn unauthorized(message: impl Into<String>) -> AuthError {
    AuthError::NoCredentials(message.into())
}

fn invalid_token(message: impl Into<String>) -> AuthError {
    AuthError::InvalidToken(message.into())
}

impl Auth {
    /// No checks at all.
    pub fn open() -> Self {
        Auth::default()
    }

    /// HS256 with a shared secret.
    pub fn with_secret(secret: &[u8], checks: &JwtChecks) -> Result<Self, KeyError> {
        if secret.len() < 16 {
            return Err(KeyError::ShortSecret);
        }
        Ok(Self::with_key(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            checks,
        ))
    }

    /// A PEM public key; the algorithm follows the key: RSA → RS256, P-256 → ES256, Ed25519 → EdDSA.
    pub fn with_public_key_file(path: &Path, checks: &JwtChecks) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        // jsonwebtoken takes a private RSA key as a decoding key and then refuses every token.
        if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
            return Err(KeyError::PrivateKey(shown));
        }
        Self::with_public_key_pem(&pem, checks).ok_or(KeyError::NotAKey(shown))
    }

    pub fn with_public_key_pem(pem: &[u8], checks: &JwtChecks) -> Option<Self> {
        let (key, algorithm) = if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            (k, Algorithm::EdDSA)
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            (k, Algorithm::ES256)
        } else if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            (k, Algorithm::RS256)
        } else {
            return None;
        };
        Some(Self::with_key(key, algorithm, checks))
    }

    fn with_key(key: DecodingKey, algorithm: Algorithm, checks: &JwtChecks) -> Self {
        // Exactly one algorithm: `none` and any other family (HS256 signed with a public key) fail.
        let mut validation = Validation::new(algorithm);
        validation.leeway = checks.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_string()]);
        if let Some(iss) = &checks.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &checks.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Auth {
            jwt: Some(Arc::new(Verifier {
                key,
                algorithm,
                validation,
            })),
            ..Auth::default()
        }
    }

    /// Adds static publish keys (accepted only as `Authorization: Bearer`, never to subscribe).
    pub fn publish_keys(mut self, keys: impl IntoIterator<Item = String>) -> Self {
        self.publish_keys.extend(keys.into_iter().map(Arc::from));
        self
    }

    /// Lets connections without a token subscribe (they never see private events).
    pub fn anonymous(mut self, anonymous: bool) -> Self {
        self.anonymous = anonymous;
        self
    }

    /// The configured verification key, its one algorithm and the leeway in seconds: the Mercure
    /// endpoint checks its own claims (`mercure`, `authorization_details`) with the same key.
    pub(crate) fn jwt_key(&self) -> Option<(&DecodingKey, Algorithm, u64)> {
        self.jwt
            .as_deref()
            .map(|v| (&v.key, v.algorithm, v.validation.leeway))
    }

    /// Whether `bearer` is one of the static publish keys.
    pub(crate) fn is_publish_key(&self, bearer: &str) -> bool {
        self.publish_keys
            .iter()
            .any(|k| same(k.as_bytes(), bearer.as_bytes()))
    }

    /// Whether tokens are checked on subscribe.
    pub fn has_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// Whether anything at all is checked.
    pub fn is_open(&self) -> bool {
        self.jwt.is_none() && self.publish_keys.is_empty()
    }

    /// Whether a token-less subscriber may connect (anonymously: no user, no private events).
    /// Always so without a JWT key, where there are no tokens to show.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous || self.jwt.is_none()
    }

    /// Lets token-less subscribers of a hub with publish keys and no JWT key name any user and
    /// receive private events, as on an open hub.
    pub fn open_subscribe(mut self, open: bool) -> Self {
        self.open_subscribe = open;
        self
    }

    /// Whether subscribing is unchecked: no keys at all, or `--open-subscribe`.
    pub fn subscribe_is_open(&self) -> bool {
        self.jwt.is_none() && (self.publish_keys.is_empty() || self.open_subscribe)
    }

    /// The caller of a publish or control request: the `Authorization: Bearer` header only (a
    /// cookie would let any page the browser visits publish as its user).
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        let Some(bearer) = bearer(headers)? else {
            return Ok(Caller::Nobody);
        };
        if let Some(i) = self
            .publish_keys
            .iter()
            .position(|k| same(k.as_bytes(), bearer.as_bytes()))
        {
            return Ok(Caller::PublishKey(i));
        }
        self.verify(bearer).map(Caller::Token)
    }

    /// The caller of `GET /events`: a bearer token, else the `herald_token` cookie, else the
    /// `access_token` query value. A publish key is accepted only as `Authorization: Bearer` of a
    /// stream that asks for herald's own `$` topics (`reserved`): a backend following presence.
    pub(crate) fn subscriber(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        reserved: bool,
    ) -> Result<Caller, AuthError> {
        if reserved
            && !self.publish_keys.is_empty()
            && let Some(bearer) = bearer(headers)?
            && let Some(i) = self
                .publish_keys
                .iter()
                .position(|k| same(k.as_bytes(), bearer.as_bytes()))
        {
            return Ok(Caller::PublishKey(i));
        }
        if self.jwt.is_none() {
            // With publish keys, a token-less subscriber is anonymous unless openness was asked
            // for: otherwise anyone could connect as `user=alice` and read her private events.
            return Ok(if self.subscribe_is_open() {
                Caller::Open
            } else {
                Caller::Nobody
            });
        }
        let token = match bearer(headers)? {
            Some(t) => Some(t.to_string()),
            None => cookie_token(headers)?.or(query_token.map(str::to_string)),
        };
        match token {
            None => Ok(Caller::Nobody),
            Some(t) => self.verify(&t).map(Caller::Token),
        }
    }

    fn verify(&self, token: &str) -> Result<Token, AuthError> {
        let Some(v) = &self.jwt else {
            return Err(invalid_token(
                "this hub accepts no tokens, only its publish keys",
            ));
        };
        let data = jsonwebtoken::decode::<Claims>(token, &v.key, &v.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            let why = match e.kind() {
                K::ExpiredSignature => "the token has expired",
                K::ImmatureSignature => "the token is not valid yet (nbf)",
                K::InvalidAudience => "the token is for another audience",
                K::InvalidIssuer => "the token is from another issuer",
                K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                    "the token is not signed with the algorithm this hub accepts"
                }
                K::InvalidSignature => "the token's signature does not verify",
                K::MissingRequiredClaim(_) => "the token lacks a required claim (exp, iss, aud)",
                _ => "the token is malformed",
            };
            invalid_token(why)
        })?;
        let claims = data.claims;
        let user = claims
            .sub
            .map(|s| {
                UserId::new(&s)
                    .map_err(|e| invalid_token(format!("the token's sub is not a user id: it {e}")))
            })
            .transpose()?;
        let selectors = |list: Vec<String>| {
            list.iter()
                .map(|s| {
                    Selector::new(s).map_err(|e| {
                        invalid_token(format!(
                            "the token's herald rights hold a bad selector: {e}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Token {
            user,
            subscribe: selectors(claims.herald.subscribe)?,
            publish: selectors(claims.herald.publish)?,
            admin: claims.herald.admin,
            expires_at_ms: claims.exp.map(|s| s.saturating_mul(1000)),
        })
    }
}

impl Caller {
    /// Publish keys and admin tokens may send to users, broadcast, and use presence and control.
    pub(crate) fn require_admin(&self) -> Result<(), AuthError> {
        match self {
            Caller::Open | Caller::PublishKey(_) => Ok(()),
            Caller::Token(t) if t.admin => Ok(()),
            Caller::Nobody => Err(unauthorized(
                "give the publish key or an admin token as Authorization: Bearer",
            )),
            Caller::Token(_) => Err(AuthError::NotAdmin(
                "this needs the publish key or a token with admin rights".into(),
            )),
        }
    }

    /// The scope of the caller's idempotency keys, so one publisher's key never matches
    /// another's: each publish key, each token subject (tokens without `sub` share one scope).
    /// `None` on an open hub, where every caller is the same publisher.
    pub(crate) fn idempotency_scope(&self) -> Option<String> {
        match self {
            Caller::Open | Caller::Nobody => None,
            Caller::PublishKey(i) => Some(format!("key:{i}")),
            Caller::Token(t) => Some(match &t.user {
                Some(u) => format!("sub:{u}"),
                None => "token".to_string(),
            }),
        }
    }

    /// Whether the caller may publish anything at all: checked before a publish body is read.
    pub(crate) fn require_some_publish(&self) -> Result<(), AuthError> {
        match self {
            Caller::Token(t) if !t.admin && t.publish.is_empty() => Err(AuthError::NotAdmin(
                "the token has no publish rights".into(),
            )),
            Caller::Nobody => Err(unauthorized(
                "give a token or the publish key as Authorization: Bearer",
            )),
            _ => Ok(()),
        }
    }

    /// Whether the caller may publish to `topic`.
    pub(crate) fn require_publish(&self, topic: &Topic) -> Result<(), AuthError> {
        match self {
            Caller::Open | Caller::PublishKey(_) => Ok(()),
            Caller::Token(t) if t.admin || t.publish.iter().any(|r| r.matches(topic)) => Ok(()),
            Caller::Nobody => Err(unauthorized(
                "give a token or the publish key as Authorization: Bearer",
            )),
            Caller::Token(_) => Err(AuthError::TopicNotCovered(format!(
                "the token's publish rights do not cover topic '{topic}'"
            ))),
        }
    }

    /// The grant a subscribing caller gets (see [`Grant`]).
    pub(crate) fn grant(&self) -> Grant {
        match self {
            Caller::Open | Caller::PublishKey(_) => Grant::All,
            Caller::Nobody => Grant::Anonymous,
            Caller::Token(t) => Grant::rights(t.subscribe.iter().cloned()),
        }
    }
}

/// The bearer token of `Authorization`, if any; a malformed header is a 401.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(unauthorized(
            "the Authorization header must be 'Bearer <token>'",
        )),
    }
}

/// Every non-empty value of the cookie `name`, in the order sent.
pub(crate) fn cookies(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The subscribe token from a cookie. `__Host-herald_token` wins: a browser takes it only from
/// this very host over HTTPS, so a sibling subdomain cannot set it. A `herald_token` can be tossed
/// in by any sibling subdomain (`Domain=example.com`); two of them mean one may be an attacker's,
/// and neither is trusted.
fn cookie_token(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    for name in ["__Host-herald_token", "herald_token"] {
        let mut values = cookies(headers, name);
        match values.len() {
            0 => continue,
            1 => return Ok(values.pop()),
            _ => {
                return Err(invalid_token(format!(
                    "several {name} cookies (one may have been set by another subdomain): use __Host-herald_token"
                )));
            }
        }
    }
    Ok(None)
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_and_cookie_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h).unwrap(), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h).unwrap(), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&h).is_err());
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; herald_token=xyz; b=2"),
        );
        assert_eq!(cookie_token(&h).unwrap().as_deref(), Some("xyz"));
        assert_eq!(cookies(&h, "nope"), Vec::<String>::new());
        // Issue 12 (not yet tried): cookie tossing. A sibling subdomain can add a second
        // herald_token; neither is trusted then, and __Host-herald_token (which it cannot set) wins.
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("herald_token=mine; herald_token=tossed"),
        );
        assert!(matches!(cookie_token(&h), Err(AuthError::InvalidToken(_))));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("herald_token=tossed; __Host-herald_token=mine"),
        );
        assert_eq!(cookie_token(&h).unwrap().as_deref(), Some("mine"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Auth::with_secret(b"short", &JwtChecks::default()).is_err());
    }
}
