//! One map from errors to what each transport says: a gRPC status, an HTTP
//! status with a JSON body, or a WebSocket `error` message (and, where the
//! connection cannot go on, a close code). Every edge reports errors through
//! [`ApiError`], so the same mistake reads the same everywhere.

use crate::auth::AuthError;
use crate::bus::BusError;
use crate::codec::CodecError;
use crate::engine::{EndReason, EngineError};
use crate::event::EventError;
use crate::filter::FilterError;
use crate::metrics::{AuthFailure, METRICS};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// WebSocket close codes (4000-4999 are the application's).
pub mod close_code {
    /// The server is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// The server is restarting (a drain): reconnect, to another node.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client broke the WebSocket protocol (an unmasked frame, RSV
    /// bits, an unknown opcode, a fragmented or oversized control frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The client missed heartbeats.
    pub const IDLE: u16 = 4000;
    /// The connection's token expired without being refreshed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client reads too slowly; reconnect and resume with `since`.
    pub const OVERFLOW: u16 = 4008;
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::InvalidArgument, message)
    }

    /// Lower-case code name, used in JSON bodies and WebSocket errors.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn grpc_status(&self) -> tonic::Status {
        let code = match self.kind {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, self.message.clone())
    }

    pub fn http_status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body of HTTP errors and the `data` of WebSocket `error`
    /// messages: `{"code": "...", "message": "..."}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"code": self.code(), "message": self.message})
    }

    /// The close code when this error ends a WebSocket connection.
    pub fn close_code(&self) -> u16 {
        match self.kind {
            ErrorKind::ResourceExhausted => close_code::OVERFLOW,
            ErrorKind::Unauthenticated => close_code::TOKEN_EXPIRED,
            ErrorKind::Unavailable => close_code::GOING_AWAY,
            _ => 1011,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.http_status(), Json(json!({"error": self.body()}))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let kind = match &error {
            EngineError::InvalidEvent(_)
            | EngineError::NoEvents
            | EngineError::MessageTooLarge(..) => ErrorKind::InvalidArgument,
            EngineError::RateLimited(_) | EngineError::PublisherRateLimited(..) => {
                ErrorKind::ResourceExhausted
            }
            EngineError::TooManySubscriptions(_)
            | EngineError::TooManyConnections(_)
            | EngineError::FilterBudget(..) => ErrorKind::ResourceExhausted,
            EngineError::UnknownSubscription(_) => ErrorKind::NotFound,
            EngineError::Bus(BusError::PositionMismatch { .. }) => ErrorKind::InvalidArgument,
            EngineError::Bus(_) => ErrorKind::Unavailable,
            EngineError::Auth(e) => return ApiError::from(e.clone()),
            EngineError::Ended(reason) => return ApiError::from(reason.clone()),
        };
        ApiError::new(kind, error.to_string())
    }
}

impl From<BusError> for ApiError {
    fn from(error: BusError) -> Self {
        ApiError::from(EngineError::Bus(error))
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let failure = match &error {
            AuthError::InvalidToken(_) => Some(AuthFailure::InvalidToken),
            AuthError::Expired => Some(AuthFailure::Expired),
            AuthError::UnknownApiKey => Some(AuthFailure::UnknownApiKey),
            AuthError::Unauthenticated(_) => Some(AuthFailure::Unauthenticated),
            AuthError::Forbidden(_) => Some(AuthFailure::Forbidden),
            AuthError::NotConfigured => Some(AuthFailure::NotConfigured),
            AuthError::Config(_) => None,
        };
        if let Some(failure) = failure {
            METRICS.auth_failed(failure);
        }
        let kind = match &error {
            AuthError::Forbidden(_) => ErrorKind::PermissionDenied,
            AuthError::Config(_) => ErrorKind::Internal,
            _ => ErrorKind::Unauthenticated,
        };
        ApiError::new(kind, error.to_string())
    }
}

impl From<FilterError> for ApiError {
    fn from(error: FilterError) -> Self {
        ApiError::invalid(error.to_string())
    }
}

impl From<EventError> for ApiError {
    fn from(error: EventError) -> Self {
        ApiError::invalid(error.to_string())
    }
}

impl From<CodecError> for ApiError {
    fn from(error: CodecError) -> Self {
        ApiError::invalid(error.to_string())
    }
}

impl From<EndReason> for ApiError {
    fn from(reason: EndReason) -> Self {
        let kind = match reason {
            EndReason::Overflow { .. } => ErrorKind::ResourceExhausted,
            EndReason::Shutdown | EndReason::History(_) => ErrorKind::Unavailable,
            EndReason::TokenExpired => ErrorKind::Unauthenticated,
        };
        ApiError::new(kind, reason.to_string())
    }
}
