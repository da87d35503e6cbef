//! Authentication (who is this?) and authorization (may they?).
//!
//! Every transport turns what the client presented (a JWT from `?token=`,
//! `Authorization: Bearer`, the WebSocket `auth` action or gRPC metadata, or
//! an API key) into a [`Principal`] with [`Auth::authenticate`]. The engine
//! asks the [`Policy`] on every subscribe, publish and (for `*`
//! subscriptions) delivery, so the rules hold the same on every transport.
//!
//! With no configuration at all the server runs in *open mode* (everyone
//! may do everything), for development; it says so at startup. Any JWT key
//! or policy file turns on the safe defaults described in [`policy`].

pub mod policy;
pub mod token;

pub use policy::{ApiKey, Policy};
pub use token::{Claims, JwtConfig, KeySource, TokenVerifier};

use jsonwebtoken::Algorithm;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq)]
pub enum AuthError {
    #[error("invalid auth configuration: {0}")]
    Config(String),
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("the token has expired")]
    Expired,
    #[error("unknown API key")]
    UnknownApiKey,
    #[error("authentication required: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    Forbidden(String),
    #[error("this server is not configured to verify tokens")]
    NotConfigured,
}

/// Who is acting.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    Anonymous,
    /// A verified token.
    User(Arc<Claims>),
    /// A server-to-server API key.
    Service(Arc<ApiKey>),
    /// strom itself (e.g. database change capture): may do everything.
    System(&'static str),
}

impl Principal {
    /// The user id for stats and presence: the token's `sub`, or
    /// `apikey:<name>`.
    pub fn user_id(&self) -> Option<String> {
        match self {
            Principal::Anonymous => None,
            Principal::User(claims) => Some(claims.subject.clone()),
            Principal::Service(key) => Some(format!("apikey:{}", key.name)),
            Principal::System(name) => Some(format!("system:{name}")),
        }
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        match self {
            Principal::User(claims) => Some(claims.expires_at),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Principal::Anonymous => "an anonymous client".into(),
            Principal::User(claims) => format!("user {:?}", claims.subject),
            Principal::Service(key) => format!("API key {:?}", key.name),
            Principal::System(name) => format!("strom's {name}"),
        }
    }
}

/// What the command line says about authentication; values given here win
/// over the `[jwt]` section of the config file.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub config_file: Option<PathBuf>,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<PathBuf>,
    pub jwks: Option<PathBuf>,
    pub jwt_algorithm: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
}

pub struct Auth {
    verifier: Option<TokenVerifier>,
    jwt: Option<JwtConfig>,
    pub policy: Policy,
}

impl Auth {
    /// Development mode: no checks, tokens ignored.
    pub fn open() -> Auth {
        Auth {
            verifier: None,
            jwt: None,
            policy: Policy::open(),
        }
    }

    pub fn from_settings(settings: &AuthSettings) -> Result<Auth, AuthError> {
        let file = match &settings.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    AuthError::Config(format!("cannot read {}: {e}", path.display()))
                })?;
                Some(policy::PolicyFile::parse(&text)?)
            }
            None => None,
        };
        let section = file.as_ref().and_then(|f| f.jwt.as_ref());
        let pick = |flag: &Option<String>, field: Option<&String>| flag.clone().or(field.cloned());
        let secret = pick(
            &settings.jwt_secret,
            section.and_then(|s| s.secret.as_ref()),
        );
        let public_key = settings
            .jwt_public_key
            .clone()
            .or_else(|| section.and_then(|s| s.public_key_file.clone()));
        let jwks = settings
            .jwks
            .clone()
            .or_else(|| section.and_then(|s| s.jwks_file.clone()));
        let key = match (secret, public_key, jwks) {
            (None, None, None) => None,
            (Some(secret), None, None) => Some(KeySource::Secret(secret)),
            (None, Some(path), None) => Some(KeySource::PublicKeyPem(path)),
            (None, None, Some(path)) => Some(KeySource::Jwks(path)),
            _ => {
                return Err(AuthError::Config(
                    "give one JWT key: a secret, a public key file or a JWKS file".into(),
                ));
            }
        };
        let jwt = match key {
            None => None,
            Some(key) => {
                let algorithm = pick(
                    &settings.jwt_algorithm,
                    section.and_then(|s| s.algorithm.as_ref()),
                );
                let algorithm = match algorithm {
                    Some(name) => name.parse::<Algorithm>().map_err(|_| {
                        AuthError::Config(format!("unknown JWT algorithm {name:?}"))
                    })?,
                    None if matches!(key, KeySource::Secret(_)) => Algorithm::HS256,
                    None => Algorithm::RS256,
                };
                Some(JwtConfig {
                    algorithm,
                    key,
                    issuer: pick(
                        &settings.jwt_issuer,
                        section.and_then(|s| s.issuer.as_ref()),
                    ),
                    audience: pick(
                        &settings.jwt_audience,
                        section.and_then(|s| s.audience.as_ref()),
                    ),
                    leeway: Duration::from_secs(
                        section.and_then(|s| s.leeway_seconds).unwrap_or(30),
                    ),
                })
            }
        };
        let verifier = jwt.as_ref().map(TokenVerifier::new).transpose()?;
        let policy = match &file {
            Some(file) => file.policy()?,
            None if jwt.is_none() => Policy::open(),
            None => policy::PolicyFile::default().policy()?,
        };
        Ok(Auth {
            verifier,
            jwt,
            policy,
        })
    }

    pub fn is_open(&self) -> bool {
        self.policy.open
    }

    /// The JWT settings, e.g. for minting development tokens.
    pub fn jwt(&self) -> Option<&JwtConfig> {
        self.jwt.as_ref()
    }

    /// Who presents `credential`: a JWT (three dot-separated parts) or an
    /// API key. `None` is the anonymous principal; so, in open mode, is a
    /// credential nothing here could verify (the same on every transport).
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        let Some(credential) = credential.map(str::trim).filter(|c| !c.is_empty()) else {
            return Ok(Principal::Anonymous);
        };
        if credential.split('.').count() == 3 {
            return match &self.verifier {
                Some(verifier) => Ok(Principal::User(Arc::new(verifier.verify(credential)?))),
                None if self.is_open() => Ok(Principal::Anonymous),
                None => Err(AuthError::NotConfigured),
            };
        }
        match self.policy.api_key(credential) {
            Some(key) => Ok(Principal::Service(Arc::new(key.clone()))),
            None if self.is_open() => Ok(Principal::Anonymous),
            None => Err(AuthError::UnknownApiKey),
        }
    }

    /// Like [`Auth::authenticate`], for the explicit `auth` action: a server
    /// that verifies no tokens says so instead of ignoring the token.
    pub fn authenticate_token(&self, token: &str) -> Result<Principal, AuthError> {
        if self.verifier.is_none() && self.policy.api_key(token).is_none() {
            return Err(AuthError::NotConfigured);
        }
        self.authenticate(Some(token))
    }
}
