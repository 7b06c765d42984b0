//! The one HTTP error type: an [`ErrorCode`] (which fixes the status), a human message as a JSON
//! body, and the mapping of the auth layer's refusals. Server-side causes are logged here and
//! never leak into the body.

use axum::Json;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::error_code::ErrorCode;

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The failing element of a batch.
    pub index: Option<usize>,
    /// Seconds for a `Retry-After` header (the code's own, unless set).
    pub retry_after: Option<u64>,
}

/// The JSON body.
#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            index: None,
            retry_after: code.retry_after(),
        }
    }

    pub fn at_index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// A failure of ours: logs `cause`, answers with the code's safe message.
    pub fn unavailable(code: ErrorCode, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(%cause, error = code.as_str(), "request failed");
        Self::from(code)
    }
}

impl From<ErrorCode> for ApiError {
    /// The code with its general message.
    fn from(code: ErrorCode) -> Self {
        ApiError::new(code, code.message())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match &e {
            AuthError::NoCredentials(_) => ErrorCode::Unauthorized,
            AuthError::InvalidToken(_) => ErrorCode::InvalidToken,
            AuthError::NotAdmin(_) => ErrorCode::Forbidden,
            AuthError::TopicNotCovered(_) => ErrorCode::ForbiddenTopic,
        };
        ApiError::new(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code.as_str(),
            message: &self.message,
            index: self.index,
        };
        let mut response = (self.code.status(), Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
