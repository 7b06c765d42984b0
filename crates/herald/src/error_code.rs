//! Every error code herald's HTTP interface can answer, listed once in [`ErrorCode`]: its machine
//! name (the JSON `error` field), its HTTP status, its `Retry-After` and a general message. Code
//! elsewhere names errors only through this type, never as strings; README's error table is
//! checked against [`ErrorCode::ALL`].

use axum::http::StatusCode;

macro_rules! error_codes {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $code:literal, $status:ident, retry $retry:expr, $message:literal;
    )*) => {
        /// An error a client can receive, as `{"error": CODE, "message": ...}` with its status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the order of the README's error table.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The machine name: the JSON body's `error`.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),* }
            }

            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status),* }
            }

            /// Seconds for the `Retry-After` header, where the code has one.
            pub fn retry_after(self) -> Option<u64> {
                match self { $(ErrorCode::$variant => $retry),* }
            }

            /// The message when the place of the error has nothing more precise to say.
            pub fn message(self) -> &'static str {
                match self { $(ErrorCode::$variant => $message),* }
            }
        }
    };
}

error_codes! {
    /// A `topic` selector of `GET /events` is not valid.
    InvalidSelector = "invalid_selector", BAD_REQUEST, retry None, "a topic selector is not valid";
    /// `maxAge=` is not a duration of at least 1s.
    InvalidMaxAge = "invalid_max_age", BAD_REQUEST, retry None, "'maxAge' must be a duration of at least 1s, like 5m";
    /// A user id (in a query, a path or a body) is not valid, or given twice.
    InvalidUser = "invalid_user", BAD_REQUEST, retry None, "a user id is not valid";
    /// More topic selectors than `--max-selectors`.
    TooManySelectors = "too_many_selectors", BAD_REQUEST, retry None, "too many topic selectors";
    /// A selector of more than 32 segments.
    SelectorTooDeep = "selector_too_deep", BAD_REQUEST, retry None, "a topic selector has too many segments";
    /// A connection's selectors have more than 512 segments together.
    TooManySegments = "too_many_segments", BAD_REQUEST, retry None, "the topic selectors have too many segments in all";
    /// `route=` is neither `1` nor `0`.
    InvalidRoute = "invalid_route", BAD_REQUEST, retry None, "'route' must be 1 or 0";
    /// `since=` is neither an event id, a duration nor `all`.
    InvalidSince = "invalid_since", BAD_REQUEST, retry None, "'since' must be an event id, a duration like 1h, or all";
    /// A publish body is not JSON, or not an object or an array of objects.
    InvalidJson = "invalid_json", BAD_REQUEST, retry None, "the body is not valid JSON";
    InvalidTopic = "invalid_topic", BAD_REQUEST, retry None, "a topic is not valid";
    InvalidEvent = "invalid_event", BAD_REQUEST, retry None, "the event type is not valid";
    /// A field of a published message has a bad value.
    InvalidField = "invalid_field", BAD_REQUEST, retry None, "a field has a bad value";
    UnknownField = "unknown_field", BAD_REQUEST, retry None, "a field is unknown";
    MissingData = "missing_data", BAD_REQUEST, retry None, "'data' is required";
    NoTarget = "no_target", BAD_REQUEST, retry None, "give topic, topics, users or broadcast";
    /// Both forms of one field (`topic` and `topics`, `user` and `users`).
    ConflictingFields = "conflicting_fields", BAD_REQUEST, retry None, "two fields say the same thing";
    EmptyBatch = "empty_batch", BAD_REQUEST, retry None, "the batch is empty";
    /// The body ended early or its chunked framing is malformed.
    IncompleteBody = "incomplete_body", BAD_REQUEST, retry None, "the body ended early or its chunked framing is malformed";
    /// A form field or query value is not UTF-8.
    InvalidEncoding = "invalid_encoding", BAD_REQUEST, retry None, "a field is not valid UTF-8";
    /// A Mercure publish (`POST /.well-known/mercure`) with a bad field: no topic, a reserved topic, id, type or retry.
    InvalidMercureUpdate = "invalid_mercure_update", BAD_REQUEST, retry None, "the Mercure update is not valid";
    /// A Mercure subscription with no topic, a bad or unsupported matcher, or an unknown `match*` parameter.
    InvalidMercureSubscription = "invalid_mercure_subscription", BAD_REQUEST, retry None, "the Mercure subscription is not valid";
    /// A Mercure token presented in a malformed way (RFC 6750 `invalid_request`).
    InvalidMercureCredentials = "invalid_mercure_credentials", BAD_REQUEST, retry None, "the token is not presented as 'Bearer <token>'";
    /// More topics and users in one message than `--max-topics`.
    TooManyTargets = "too_many_targets", BAD_REQUEST, retry None, "a message has too many topics and users";
    InvalidLimit = "invalid_limit", BAD_REQUEST, retry None, "'limit' is not valid";
    InvalidBlock = "invalid_block", BAD_REQUEST, retry None, "'block' is not a duration";
    InvalidReason = "invalid_reason", BAD_REQUEST, retry None, "'reason' must be 1 to 256 bytes";
    /// A line of a streaming publish body (`text/event-stream`) is not valid: not UTF-8, an
    /// unknown field, or the body ended inside an event. Earlier events were published.
    InvalidStream = "invalid_stream", BAD_REQUEST, retry None, "a line of the streamed body is not valid text/event-stream";
    /// A message the history's row layout cannot hold; nothing was stored.
    Unstorable = "unstorable", BAD_REQUEST, retry None, "the message cannot be stored";
    /// A publish to a topic starting with `$` (such as `$presence/alice`): those are herald's own.
    ReservedTopic = "reserved_topic", BAD_REQUEST, retry None, "topics starting with '$' belong to herald";
    /// Plain HTTP sent to the HTTPS port (answered in plain HTTP, then the connection closes).
    HttpsRequired = "https_required", BAD_REQUEST, retry None, "this port speaks HTTPS (TLS): use an https:// URL";
    /// No credentials where they are needed, or a malformed `Authorization` header.
    Unauthorized = "unauthorized", UNAUTHORIZED, retry None, "this needs credentials";
    /// A token that does not verify, has expired, or carries bad claims.
    InvalidToken = "invalid_token", UNAUTHORIZED, retry None, "the token is not valid";
    /// Presence, control, users or broadcast without the publish key or an admin token.
    Forbidden = "forbidden", FORBIDDEN, retry None, "this needs the publish key or an admin token";
    /// The token's publish rights do not cover a topic.
    ForbiddenTopic = "forbidden_topic", FORBIDDEN, retry None, "the token may not publish to this topic";
    /// The token is for another user, or for none.
    ForbiddenUser = "forbidden_user", FORBIDDEN, retry None, "the token is for another user";
    /// The token's subscribe rights do not cover a selector.
    ForbiddenSelector = "forbidden_selector", FORBIDDEN, retry None, "the token may not subscribe to this selector";
    /// A browser form post from an origin other than the hub's and `--cors-origin`.
    CrossOriginForm = "cross_origin_form", FORBIDDEN, retry None, "a form post from another site is refused";
    /// `GET /users/{id}/messages` with the user's own token while the user is blocked.
    UserBlocked = "user_blocked", FORBIDDEN, retry None, "this user is blocked";
    NotFound = "not_found", NOT_FOUND, retry None, "no such route";
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED, retry None, "this route does not take that method";
    /// The publish body did not arrive within `--body-timeout`.
    BodyTimeout = "body_timeout", REQUEST_TIMEOUT, retry None, "the body did not arrive in time";
    /// An `idempotencyKey` repeated with a different message.
    IdempotencyConflict = "idempotency_conflict", CONFLICT, retry None, "the idempotencyKey was used with a different payload";
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE, retry None, "the body is too large";
    /// A batch of more than `--max-batch` messages.
    BatchTooLarge = "batch_too_large", PAYLOAD_TOO_LARGE, retry None, "the batch has too many messages";
    UriTooLong = "uri_too_long", URI_TOO_LONG, retry None, "the URL is too long";
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, retry None, "send application/json or application/x-www-form-urlencoded";
    /// The request's `Host` is not in `--allowed-host`.
    HostNotAllowed = "host_not_allowed", MISDIRECTED_REQUEST, retry None, "this hub does not answer for that host";
    /// Streams per IP or per user at their limit.
    TooManyConnections = "too_many_connections", TOO_MANY_REQUESTS, retry Some(5), "too many streams";
    /// The publisher's token bucket is empty (`Retry-After` says when it has a token again).
    RateLimited = "rate_limited", TOO_MANY_REQUESTS, retry Some(1), "too many publishes; retry later";
    HeaderTooLarge = "header_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE, retry None, "the request head is too large";
    /// `GET /events` at `--max-connections`.
    AtCapacity = "at_capacity", SERVICE_UNAVAILABLE, retry Some(5), "the hub is at its connection limit";
    ShuttingDown = "shutting_down", SERVICE_UNAVAILABLE, retry Some(1), "the hub is shutting down";
    /// The history store failed; nothing was published.
    StoreUnavailable = "store_unavailable", SERVICE_UNAVAILABLE, retry Some(1), "the hub cannot do this right now; retry later";
    /// In cluster mode, Redis could not answer a cluster-wide query or control.
    ClusterUnavailable = "cluster_unavailable", SERVICE_UNAVAILABLE, retry Some(1), "the hub cannot do this right now; retry later";
    /// With `--redis-replicas N`, fewer than N Redis replicas acknowledged the publish in time; it
    /// is not acknowledged (retry with the same idempotency key: it will not publish twice).
    NotReplicated = "not_replicated", SERVICE_UNAVAILABLE, retry Some(1), "fewer Redis replicas than --redis-replicas acknowledged the publish in time; retry with the same idempotency key";
    /// `GET /readyz` while this node cannot reach its shared history.
    NotReady = "not_ready", SERVICE_UNAVAILABLE, retry Some(1), "this node cannot reach its shared history";
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn codes_are_unique_snake_case_errors() {
        let names: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for c in ErrorCode::ALL {
            assert!(
                c.as_str()
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{c:?}"
            );
            assert!(
                c.status().is_client_error() || c.status().is_server_error(),
                "{c:?}"
            );
        }
    }

    /// `(status, code)` for every code listed in the README's error table.
    fn readme_codes() -> BTreeSet<(u16, String)> {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md");
        let errors = &readme[readme.find("\n## Errors").expect("an Errors section")..];
        let errors = &errors[..errors[1..].find("\n## ").map_or(errors.len(), |i| i + 1)];
        let mut found = BTreeSet::new();
        for line in errors.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (Some(status), Some(codes)) = (
                cells.get(1).and_then(|s| s.parse::<u16>().ok()),
                cells.get(2),
            ) else {
                continue;
            };
            for code in codes.split('`').skip(1).step_by(2) {
                if code.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    found.insert((status, code.to_string()));
                }
            }
        }
        found
    }

    #[test]
    fn readme_error_table_lists_exactly_the_codes_with_their_statuses() {
        let ours: BTreeSet<(u16, String)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.status().as_u16(), c.as_str().to_string()))
            .collect();
        let readme = readme_codes();
        let missing: Vec<_> = ours.difference(&readme).collect();
        let unknown: Vec<_> = readme.difference(&ours).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "README's error table lacks {missing:?} and lists codes the server never returns {unknown:?}"
        );
    }
}
