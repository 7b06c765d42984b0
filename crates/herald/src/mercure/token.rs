//! Mercure access tokens: where a request carries one (the `Authorization` header, the v0.x
//! `authorization` query parameter, the `mercureAuthorization` and draft-08
//! `__Secure-mercure_access_token` cookies) and what it grants. Two shapes, told apart by the
//! header's `typ`: draft-08 RFC 9068 tokens (`at+jwt`: `exp`, `iss` and `aud` required, `aud`
//! naming the hub's resource; rights in `authorization_details`) and v0.x tokens (rights in the
//! `mercure` claim; `exp`, `aud`, `iss` optional). Both are checked with herald's one configured
//! key and algorithm. A token either verifies in full or is refused: no partial rights.

use std::collections::HashSet;

use axum::http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::Value;

use super::selector::TopicSelector;
use crate::auth::Auth;

/// The `type` of a Mercure authorization detail.
pub const DETAIL_TYPE: &str = "https://mercure.rocks/authorization-detail";
/// The draft-08 cookie name (and the v0.x one).
pub const COOKIES: [&str; 2] = ["__Secure-mercure_access_token", "mercureAuthorization"];
/// Most authorization details, and topic matchers per detail or claim list, a token may carry.
const LIST_MAX: usize = 256;

/// What a verified token allows.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub publish: Vec<TopicSelector>,
    pub subscribe: Vec<TopicSelector>,
    /// Payloads for the subscriptions API, in the token's order: each with the subscribe matchers
    /// of its draft-08 detail (`*` for the v0.x `mercure.payload`). See [`Grants::payload_for`].
    pub payloads: Vec<(Vec<TopicSelector>, Value)>,
    /// `sub`, if any.
    pub subject: Option<String>,
    /// `exp`, in ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// A draft-08 `at+jwt` token (else v0.x).
    pub draft08: bool,
}

impl Grants {
    /// The payload of a subscription made with `matcher`: the first payload whose matchers match
    /// the matcher's own text, as if it were a topic (draft-08 "Payloads"); v0.x's for any.
    pub fn payload_for(&self, matcher: &str) -> Option<&Value> {
        self.payloads
            .iter()
            .find(|(on, _)| on.iter().any(|s| s.matches(matcher)))
            .map(|(_, p)| p)
    }
}

/// Why a request's credentials were refused, in RFC 6750 terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token where one is needed: 401 with a bare `Bearer` challenge.
    Missing,
    /// The token does not verify or carries bad claims: 401 `invalid_token`.
    InvalidToken(String),
    /// The token is valid but does not allow this: 403 `insufficient_scope`.
    InsufficientScope(String),
    /// The token's presentation is malformed: 400 `invalid_request`.
    InvalidRequest(String),
}

/// The token a request presents: the header wins over the cookie (which is ambient); the v0.x
/// query parameter comes before the cookie, as in Mercure v0.x.
pub fn presented(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, Refusal> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| Refusal::InvalidRequest("the Authorization header is not ASCII".into()))?;
        return match value.split_once(' ') {
            Some((scheme, token))
                if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
            {
                Ok(Some(token.trim().to_string()))
            }
            _ => Err(Refusal::InvalidRequest(
                "the Authorization header must be 'Bearer <token>'".into(),
            )),
        };
    }
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        return Ok(Some(q.to_string()));
    }
    for name in COOKIES {
        let mut values = crate::auth::cookies(headers, name);
        match values.len() {
            0 => continue,
            1 => return Ok(values.pop()),
            _ => {
                return Err(Refusal::InvalidRequest(format!(
                    "several {name} cookies: send one"
                )));
            }
        }
    }
    Ok(None)
}

#[derive(Deserialize)]
struct Claims {
    exp: Option<u64>,
    iss: Option<String>,
    aud: Option<Value>,
    sub: Option<String>,
    mercure: Option<V0Claim>,
    authorization_details: Option<Value>,
}

#[derive(Deserialize)]
struct V0Claim {
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    subscribe: Option<Vec<String>>,
    #[serde(default)]
    payload: Option<Value>,
}

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal::InvalidToken(why.into())
}

/// Verifies `token` with herald's key; `resources` are the identifiers a draft-08 `aud` may name.
pub fn verify(auth: &Auth, token: &str, resources: &[String]) -> Result<Grants, Refusal> {
    let Some((key, algorithm, leeway)) = auth.jwt_key() else {
        return Err(invalid(
            "this hub has no JWT key (--jwt-secret or --jwt-public-key)",
        ));
    };
    let head = jsonwebtoken::decode_header(token).map_err(|_| invalid("the token is malformed"))?;
    let draft08 = head.typ.as_deref().is_some_and(|t| {
        let t = t.to_ascii_lowercase();
        t == "at+jwt" || t == "application/at+jwt"
    });
    let mut validation = jsonwebtoken::Validation::new(algorithm);
    validation.leeway = leeway;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.required_spec_claims = if draft08 {
        HashSet::from(["exp".to_string(), "iss".into(), "aud".into()])
    } else {
        HashSet::new()
    };
    let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            invalid(match e.kind() {
                K::ExpiredSignature => "the token has expired",
                K::ImmatureSignature => "the token is not valid yet (nbf)",
                K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                    "the token is not signed with the algorithm this hub accepts"
                }
                K::InvalidSignature => "the token's signature does not verify",
                K::MissingRequiredClaim(_) => "an at+jwt token needs exp, iss and aud",
                _ => "the token is malformed or its claims have the wrong types",
            })
        })?
        .claims;
    let mut grants = Grants {
        subject: claims.sub,
        expires_at_ms: claims.exp.map(|s| s.saturating_mul(1000)),
        draft08,
        ..Grants::default()
    };
    if draft08 {
        if claims.iss.as_deref().is_none_or(str::is_empty) {
            return Err(invalid("the token's iss is empty"));
        }
        let aud_ok = match &claims.aud {
            Some(Value::String(a)) => resources.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .any(|a| a.as_str().is_some_and(|a| resources.iter().any(|r| r == a))),
            _ => false,
        };
        if !aud_ok {
            return Err(invalid(format!(
                "the token's aud does not name this hub ({})",
                resources.first().map_or("", String::as_str)
            )));
        }
        if let Some(details) = claims.authorization_details {
            read_details(&details, &mut grants)?;
        }
    } else if let Some(m) = claims.mercure {
        let list = |l: Option<Vec<String>>| -> Result<Vec<TopicSelector>, Refusal> {
            let l = l.unwrap_or_default();
            if l.len() > LIST_MAX {
                return Err(invalid("the mercure claim lists too many topics"));
            }
            l.iter()
                .map(|s| {
                    TopicSelector::v0(s)
                        .map_err(|e| invalid(format!("a topic selector of the mercure claim {e}")))
                })
                .collect()
        };
        grants.publish = list(m.publish)?;
        grants.subscribe = list(m.subscribe)?;
        if let Some(p) = m.payload {
            grants.payloads.push((vec![TopicSelector::Any], p));
        }
    }
    Ok(grants)
}

/// Reads `authorization_details`: every Mercure detail must be well formed, or the token is refused.
fn read_details(details: &Value, grants: &mut Grants) -> Result<(), Refusal> {
    let Value::Array(details) = details else {
        return Err(invalid("authorization_details must be an array"));
    };
    if details.len() > LIST_MAX {
        return Err(invalid("authorization_details has too many entries"));
    }
    for detail in details {
        let Value::Object(detail) = detail else {
            return Err(invalid("an authorization detail must be an object"));
        };
        if detail.get("type").and_then(Value::as_str) != Some(DETAIL_TYPE) {
            continue;
        }
        let actions = match detail.get("actions") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| invalid("an action must be a string"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(invalid("a Mercure authorization detail needs actions")),
        };
        let topics = match detail.get("topics") {
            Some(Value::Array(t)) if !t.is_empty() && t.len() <= LIST_MAX => {
                t.iter().map(read_matcher).collect::<Result<Vec<_>, _>>()?
            }
            _ => {
                return Err(invalid(
                    "a Mercure authorization detail needs a non-empty topics list",
                ));
            }
        };
        let payload = match detail.get("payload") {
            None => None,
            Some(p @ Value::Object(_)) => Some(p.clone()),
            Some(_) => {
                return Err(invalid(
                    "an authorization detail's payload must be an object",
                ));
            }
        };
        for action in actions {
            match action {
                "publish" => grants.publish.extend(topics.iter().cloned()),
                "subscribe" => {
                    grants.subscribe.extend(topics.iter().cloned());
                    if let Some(p) = &payload {
                        grants.payloads.push((topics.clone(), p.clone()));
                    }
                }
                _ => {} // unknown actions grant nothing
            }
        }
    }
    Ok(())
}

fn read_matcher(m: &Value) -> Result<TopicSelector, Refusal> {
    let Some(pattern) = m.get("match").and_then(Value::as_str) else {
        return Err(invalid("a topic matcher needs a string 'match'"));
    };
    let made = match m.get("match_type") {
        None => TopicSelector::exact(pattern),
        Some(Value::String(t)) if t == "exact" => TopicSelector::exact(pattern),
        Some(Value::String(t)) if t == "urlpattern" => TopicSelector::url_pattern(pattern),
        Some(other) => return Err(invalid(format!("unknown match_type {other}"))),
    };
    made.map_err(|e| invalid(format!("a topic matcher {e}")))
}
