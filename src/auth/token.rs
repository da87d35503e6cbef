//! JSON Web Tokens: verification (and minting, for development).
//!
//! The algorithm is fixed by configuration, never taken from the token, so
//! `alg: none` and an HS256 token signed with an RSA public key are refused.
//! `exp` is required and, like `nbf`, always checked; `iss` and `aud` are
//! checked when configured. Keys: a shared secret (HS256/384/512), a PEM
//! public key (RS*, PS*, ES256/384, EdDSA), or a JWKS file whose key is
//! chosen by the token's `kid`.

use super::AuthError;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the verification key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Secret(String),
    PublicKeyPem(PathBuf),
    Jwks(PathBuf),
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub algorithm: Algorithm,
    pub key: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Allowed clock skew for `exp` and `nbf`.
    pub leeway: Duration,
}

/// A verified token: its subject, claims and expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub subject: String,
    pub claims: Map<String, Value>,
    pub expires_at: SystemTime,
}

enum Keys {
    One(DecodingKey),
    Set(Vec<(Option<String>, DecodingKey)>),
}

pub struct TokenVerifier {
    keys: Keys,
    validation: Validation,
}

impl TokenVerifier {
    pub fn new(config: &JwtConfig) -> Result<TokenVerifier, AuthError> {
        use jsonwebtoken::jwk::AlgorithmParameters;
        let bad_key = |why: String| AuthError::Config(format!("JWT key: {why}"));
        let family_matches = |alg: Algorithm| match (&config.key, alg) {
            (KeySource::Secret(_), Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => true,
            (KeySource::Secret(_), _) => false,
            (_, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => false,
            _ => true,
        };
        if !family_matches(config.algorithm) {
            return Err(bad_key(format!(
                "{:?} does not go with this kind of key (HS* take a secret; RS*, PS*, ES*, EdDSA a public key or JWKS)",
                config.algorithm
            )));
        }
        let keys = match &config.key {
            KeySource::Secret(secret) => {
                if secret.len() < 32 {
                    return Err(bad_key("the secret must be at least 32 bytes".into()));
                }
                Keys::One(DecodingKey::from_secret(secret.as_bytes()))
            }
            KeySource::PublicKeyPem(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| bad_key(format!("cannot read {}: {e}", path.display())))?;
                let key = match config.algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                }
                .map_err(|e| bad_key(format!("{}: {e}", path.display())))?;
                Keys::One(key)
            }
            KeySource::Jwks(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad_key(format!("cannot read {}: {e}", path.display())))?;
                let set: JwkSet = serde_json::from_str(&text)
                    .map_err(|e| bad_key(format!("{}: {e}", path.display())))?;
                let keys = set
                    .keys
                    .iter()
                    .filter(|jwk| !matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)))
                    .map(|jwk| Ok((jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)?)))
                    .collect::<Result<Vec<_>, jsonwebtoken::errors::Error>>()
                    .map_err(|e| bad_key(format!("{}: {e}", path.display())))?;
                if keys.is_empty() {
                    return Err(bad_key(format!("{} holds no public key", path.display())));
                }
                Keys::Set(keys)
            }
        };
        let mut validation = Validation::new(config.algorithm);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        // A configured issuer or audience must also be present, not just
        // right when present.
        let mut required = vec!["exp", "sub"];
        required.extend(config.issuer.as_ref().map(|_| "iss"));
        required.extend(config.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.validate_aud = config.audience.is_some();
        if let Some(audience) = &config.audience {
            validation.set_audience(&[audience]);
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
        }
        Ok(TokenVerifier { keys, validation })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let key = match &self.keys {
            Keys::One(key) => key,
            Keys::Set(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                match &header.kid {
                    Some(kid) => keys
                        .iter()
                        .find(|(id, _)| id.as_deref() == Some(kid))
                        .map(|(_, key)| key)
                        .ok_or_else(|| {
                            AuthError::InvalidToken(format!("no key with kid {kid:?}"))
                        })?,
                    None if keys.len() == 1 => &keys[0].1,
                    None => {
                        return Err(AuthError::InvalidToken(
                            "the token has no kid to choose a key by".into(),
                        ));
                    }
                }
            }
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            .map_err(invalid)?;
        let claims = data.claims;
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(AuthError::InvalidToken(
                    "`sub` must be a non-empty string".into(),
                ));
            }
        };
        // A NumericDate may have a fraction (RFC 7519 §2); the validation
        // above has checked that `exp` is a number in the future.
        // Beyond the year 9999 is forever, as far as a connection goes.
        const LAST_SECOND: f64 = 253_402_300_799.0;
        let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0);
        Ok(Claims {
            subject,
            expires_at: UNIX_EPOCH + Duration::from_secs_f64(exp.clamp(0.0, LAST_SECOND)),
            claims,
        })
    }
}

fn invalid(error: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    let reason = match error.kind() {
        K::ExpiredSignature => return AuthError::Expired,
        K::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
        K::InvalidSignature => "bad signature".to_owned(),
        K::InvalidAlgorithm => "the token's algorithm is not the configured one".to_owned(),
        K::InvalidIssuer => "wrong issuer (iss)".to_owned(),
        K::InvalidAudience => "wrong audience (aud)".to_owned(),
        K::MissingRequiredClaim(claim) => format!("the token has no `{claim}` claim"),
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed token".to_owned(),
        other => format!("{other:?}"),
    };
    AuthError::InvalidToken(reason)
}

/// Signs a token, for `strom token` and tests. HS* algorithms take the
/// secret; the others a PEM private key.
pub fn mint(
    algorithm: Algorithm,
    key: &[u8],
    subject: &str,
    extra: Map<String, Value>,
    ttl: Duration,
) -> Result<String, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = extra;
    claims.insert("sub".into(), subject.into());
    claims.insert("iat".into(), now.into());
    claims
        .entry("exp")
        .or_insert_with(|| (now + ttl.as_secs()).into());
    let bad = |e: jsonwebtoken::errors::Error| AuthError::Config(format!("signing key: {e}"));
    let key = match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(key),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key).map_err(bad)?,
        Algorithm::EdDSA => EncodingKey::from_ed_pem(key).map_err(bad)?,
        _ => EncodingKey::from_rsa_pem(key).map_err(bad)?,
    };
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)
        .map_err(|e| AuthError::Config(format!("signing: {e}")))
}
