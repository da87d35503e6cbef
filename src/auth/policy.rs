//! The authorization policy: who may subscribe to and publish on which
//! collection, and which rows each subscriber may see.
//!
//! Rules are matched in file order by collection pattern (`orders`,
//! `chat.*`, `*`); the first match decides. A collection no rule matches
//! gets the safe default: subscribing needs a valid token, publishing needs
//! a grant. A rule's `row_filter` (e.g. `owner_id = $sub`) is bound to the
//! subscriber's claims and combined with the subscriber's own filter by
//! `and`, so a client filter can only narrow it. API keys are for trusted
//! servers: their own lists decide, and row filters do not apply to them.
//!
//! Presence follows the same rules ([`Policy::check_presence`]): who is in
//! channel `X`, and its joins and leaves, only for those who may subscribe
//! to `X`; who is connected at all for those the `presence` setting admits
//! (default `authenticated`). The `presence` collection itself is reserved,
//! so no rule may name it.

use super::{AuthError, Principal};
use crate::filter::Filter;
use serde::Deserialize;
use serde_json::Value;

/// Who may do something.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    Anyone,
    Authenticated,
    /// The token's grants claim lists the collection for this action.
    Granted,
    /// The token has claim `name` equal to `value` (or a list holding it).
    Claim {
        name: String,
        value: Value,
    },
    Nobody,
}

impl Access {
    /// `anyone`, `authenticated`, `granted`, `nobody` or `claim:NAME=VALUE`.
    pub fn parse(text: &str) -> Result<Access, AuthError> {
        Ok(match text {
            "anyone" => Access::Anyone,
            "authenticated" => Access::Authenticated,
            "granted" => Access::Granted,
            "nobody" => Access::Nobody,
            other => {
                let (name, value) = other
                    .strip_prefix("claim:")
                    .and_then(|rest| rest.split_once('='))
                    .ok_or_else(|| {
                        AuthError::Config(format!(
                            "unknown access {other:?}: use anyone, authenticated, granted, nobody or claim:NAME=VALUE"
                        ))
                    })?;
                let value = serde_json::from_str(value).unwrap_or(Value::String(value.into()));
                Access::Claim {
                    name: name.into(),
                    value,
                }
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub subscribe: Access,
    pub publish: Access,
    /// A filter with `$claim` parameters.
    pub row_filter: Option<Filter>,
}

/// A server-to-server credential.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub name: String,
    pub key: String,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    /// Events per second the key may publish (burst: as many at once);
    /// `None`: unlimited.
    pub publish_rate: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// Development mode: every action is allowed.
    pub open: bool,
    /// The claim holding grants: `{"subscribe": [...], "publish": [...]}`.
    pub grants_claim: String,
    pub rules: Vec<Rule>,
    pub api_keys: Vec<ApiKey>,
    /// Who may see who is connected at all (presence without a channel).
    pub presence: Access,
}

impl Policy {
    pub fn open() -> Policy {
        Policy {
            open: true,
            grants_claim: DEFAULT_GRANTS_CLAIM.into(),
            rules: Vec::new(),
            api_keys: Vec::new(),
            presence: Access::Authenticated,
        }
    }

    fn rule(&self, collection: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|rule| pattern_matches(&rule.pattern, collection))
    }

    /// May `principal` subscribe to `collection` (not `*`)? When yes, the
    /// row filter it is bound to, if any.
    pub fn check_subscribe(
        &self,
        principal: &Principal,
        collection: &str,
    ) -> Result<Option<Filter>, AuthError> {
        if self.open {
            return Ok(None);
        }
        self.check(principal, collection, Action::Subscribe)?;
        let Some(template) = self
            .rule(collection)
            .and_then(|rule| rule.row_filter.as_ref())
        else {
            return Ok(None);
        };
        let claims = match principal {
            Principal::User(claims) => claims,
            // Rows are per user: someone without a token owns none.
            Principal::Anonymous => {
                return Err(AuthError::Unauthenticated(format!(
                    "the rows of {collection:?} are per user: subscribe with a token"
                )));
            }
            // API keys are trusted servers; row rules do not apply.
            Principal::Service(_) | Principal::System(_) => return Ok(None),
        };
        let lookup = |name: &str| {
            if name == "sub" {
                return Some(Value::String(claims.subject.clone()));
            }
            let mut parts = name.split('.');
            let first = claims.claims.get(parts.next()?)?;
            parts.try_fold(first, |v, part| v.get(part)).cloned()
        };
        template.bind(&lookup).map(Some).map_err(|e| {
            AuthError::Forbidden(format!(
                "the row rule of {collection:?} cannot apply to this token: {e}"
            ))
        })
    }

    pub fn check_publish(&self, principal: &Principal, collection: &str) -> Result<(), AuthError> {
        if self.open {
            return Ok(());
        }
        self.check(principal, collection, Action::Publish)
    }

    /// May `principal` see who is in `channel` (and its joins and leaves)?
    /// Exactly when it may subscribe to that channel; a row filter makes no
    /// difference. Without a channel (who is connected at all), the
    /// `presence` setting decides; an API key needs `presence` in its
    /// `subscribe` list.
    pub fn check_presence(
        &self,
        principal: &Principal,
        channel: Option<&str>,
    ) -> Result<(), AuthError> {
        if self.open {
            return Ok(());
        }
        match channel {
            Some(channel) => self.check(principal, channel, Action::Subscribe),
            None => self.check_access(
                principal,
                PRESENCE_LIST,
                Action::Subscribe,
                &self.presence,
                || "see who is connected".into(),
            ),
        }
    }

    fn check(
        &self,
        principal: &Principal,
        collection: &str,
        action: Action,
    ) -> Result<(), AuthError> {
        let default = match action {
            Action::Subscribe => Access::Authenticated,
            Action::Publish => Access::Granted,
        };
        let access = match (self.rule(collection), action) {
            (Some(rule), Action::Subscribe) => &rule.subscribe,
            (Some(rule), Action::Publish) => &rule.publish,
            (None, _) => &default,
        };
        self.check_access(principal, collection, action, access, || {
            format!("{} on {collection:?}", action.as_str())
        })
    }

    /// Whether `access` admits `principal` to `action` on `collection`
    /// (grants and API key lists name `collection`); `what` names the
    /// action in the refusal.
    fn check_access(
        &self,
        principal: &Principal,
        collection: &str,
        action: Action,
        access: &Access,
        what: impl Fn() -> String,
    ) -> Result<(), AuthError> {
        let denied = || match principal {
            Principal::Anonymous => AuthError::Unauthenticated(format!("{} needs a token", what())),
            other => AuthError::Forbidden(format!("{} may not {}", other.describe(), what())),
        };
        if let Principal::System(_) = principal {
            return Ok(());
        }
        if let Principal::Service(key) = principal {
            let list = match action {
                Action::Subscribe => &key.subscribe,
                Action::Publish => &key.publish,
            };
            return if list.iter().any(|p| pattern_matches(p, collection)) {
                Ok(())
            } else {
                Err(denied())
            };
        }
        let allowed = match (access, principal) {
            (Access::Anyone, _) => true,
            (Access::Nobody, _) | (_, Principal::Anonymous) => false,
            (Access::Authenticated, _) => true,
            (Access::Granted, Principal::User(claims)) => claims
                .claims
                .get(&self.grants_claim)
                .and_then(|grants| grants.get(action.as_str()))
                .and_then(Value::as_array)
                .is_some_and(|patterns| {
                    patterns
                        .iter()
                        .filter_map(Value::as_str)
                        .any(|p| pattern_matches(p, collection))
                }),
            (Access::Claim { name, value }, Principal::User(claims)) => {
                match claims.claims.get(name) {
                    Some(Value::Array(items)) => items.contains(value),
                    Some(held) => held == value,
                    None => false,
                }
            }
            (_, Principal::Service(_) | Principal::System(_)) => unreachable!("handled above"),
        };
        if allowed { Ok(()) } else { Err(denied()) }
    }

    /// The API key with this secret, if any.
    pub fn api_key(&self, secret: &str) -> Option<&ApiKey> {
        self.api_keys
            .iter()
            .find(|k| constant_time_eq(k.key.as_bytes(), secret.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `*` matches any run of characters; everything else matches itself.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| pattern_matches(rest, &tail[i..]))
        }
    }
}

pub const DEFAULT_GRANTS_CLAIM: &str = "strom";

/// The name grants and API key `subscribe` lists use for the list of who is
/// connected at all.
pub const PRESENCE_LIST: &str = crate::event::PRESENCE_COLLECTION;

/// The `--config` file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub open: bool,
    pub jwt: Option<JwtSection>,
    pub grants_claim: Option<String>,
    /// Who may see who is connected at all: an access like a rule's
    /// `subscribe` (default `authenticated`).
    pub presence: Option<String>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeySection>,
    #[serde(default)]
    pub collections: Vec<RuleSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub algorithm: Option<String>,
    pub secret: Option<String>,
    pub public_key_file: Option<std::path::PathBuf>,
    pub jwks_file: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySection {
    pub name: String,
    pub key: Option<String>,
    /// Name of an environment variable holding the key.
    pub key_env: Option<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    /// Events per second the key may publish; unset: unlimited.
    pub publish_rate: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    #[serde(rename = "match")]
    pub pattern: String,
    pub subscribe: Option<String>,
    pub publish: Option<String>,
    pub row_filter: Option<String>,
}

impl PolicyFile {
    pub fn parse(text: &str) -> Result<PolicyFile, AuthError> {
        toml::from_str(text).map_err(|e| AuthError::Config(e.to_string()))
    }

    /// The policy part (the `jwt` section is read by the caller).
    pub fn policy(&self) -> Result<Policy, AuthError> {
        let rules = self
            .collections
            .iter()
            .map(|r| {
                if r.pattern == crate::event::PRESENCE_COLLECTION {
                    return Err(AuthError::Config(format!(
                        "a rule cannot match {:?}: that collection is reserved for presence, which follows each channel's `subscribe` rule (set `presence = ...` at the top for who may see who is connected at all)",
                        r.pattern
                    )));
                }
                let access = |field: &Option<String>, default: Access| {
                    field.as_deref().map_or(Ok(default), Access::parse)
                };
                let row_filter = r
                    .row_filter
                    .as_deref()
                    .map(Filter::parse)
                    .transpose()
                    .map_err(|e| {
                        AuthError::Config(format!("row_filter of {:?}: {e}", r.pattern))
                    })?;
                Ok(Rule {
                    pattern: r.pattern.clone(),
                    subscribe: access(&r.subscribe, Access::Authenticated)?,
                    publish: access(&r.publish, Access::Granted)?,
                    row_filter,
                })
            })
            .collect::<Result<_, AuthError>>()?;
        let api_keys = self
            .api_keys
            .iter()
            .map(|k| {
                let key = match (&k.key, &k.key_env) {
                    (Some(key), None) => key.clone(),
                    (None, Some(var)) => std::env::var(var).map_err(|_| {
                        AuthError::Config(format!(
                            "api key {:?}: environment variable {var} is not set",
                            k.name
                        ))
                    })?,
                    _ => {
                        return Err(AuthError::Config(format!(
                            "api key {:?}: give exactly one of `key` and `key_env`",
                            k.name
                        )));
                    }
                };
                if key.len() < 16 {
                    return Err(AuthError::Config(format!(
                        "api key {:?} is shorter than 16 characters",
                        k.name
                    )));
                }
                Ok(ApiKey {
                    name: k.name.clone(),
                    key,
                    subscribe: k.subscribe.clone(),
                    publish: k.publish.clone(),
                    publish_rate: k.publish_rate,
                })
            })
            .collect::<Result<_, AuthError>>()?;
        Ok(Policy {
            open: self.open,
            grants_claim: self
                .grants_claim
                .clone()
                .unwrap_or_else(|| DEFAULT_GRANTS_CLAIM.into()),
            rules,
            api_keys,
            presence: self
                .presence
                .as_deref()
                .map_or(Ok(Access::Authenticated), Access::parse)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::Claims;
    use serde_json::json;
    use std::sync::Arc;

    fn user(claims: Value) -> Principal {
        let claims = claims.as_object().unwrap().clone();
        Principal::User(Arc::new(Claims {
            subject: claims["sub"].as_str().unwrap().into(),
            claims,
            expires_at: std::time::SystemTime::now(),
        }))
    }

    const FILE: &str = r#"
        [[api_keys]]
        name = "billing"
        key = "0123456789abcdef0123"
        publish = ["orders", "invoices.*"]

        [[collections]]
        match = "public.*"
        subscribe = "anyone"

        [[collections]]
        match = "orders"
        subscribe = "authenticated"
        publish = "claim:role=admin"
        row_filter = "owner_id = $sub"

        [[collections]]
        match = "secret"
        subscribe = "nobody"
    "#;

    #[test]
    fn rules_decide_in_order_with_safe_defaults() {
        let policy = PolicyFile::parse(FILE).unwrap().policy().unwrap();
        let anon = Principal::Anonymous;
        let alice = user(json!({"sub": "alice"}));
        let admin = user(json!({"sub": "root", "role": ["ops", "admin"]}));
        let granted = user(json!({"sub": "svc", "strom": {"publish": ["news*"]}}));
        assert!(policy.check_subscribe(&anon, "public.news").is_ok());
        assert!(matches!(
            policy.check_subscribe(&anon, "posts"),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(policy.check_subscribe(&alice, "posts").is_ok());
        assert!(matches!(
            policy.check_subscribe(&alice, "secret"),
            Err(AuthError::Forbidden(_))
        ));
        assert!(matches!(
            policy.check_publish(&alice, "orders"),
            Err(AuthError::Forbidden(_))
        ));
        assert!(policy.check_publish(&admin, "orders").is_ok());
        assert!(
            policy.check_publish(&alice, "posts").is_err(),
            "publishing needs a grant"
        );
        assert!(policy.check_publish(&granted, "newsroom").is_ok());
        let billing = Principal::Service(Arc::new(
            policy.api_key("0123456789abcdef0123").unwrap().clone(),
        ));
        assert!(policy.check_publish(&billing, "invoices.2025").is_ok());
        assert!(policy.check_publish(&billing, "posts").is_err());
        assert!(policy.api_key("0123456789abcdef0124").is_none());
    }

    #[test]
    fn row_filters_bind_to_the_subject() {
        let policy = PolicyFile::parse(FILE).unwrap().policy().unwrap();
        let alice = user(json!({"sub": "alice"}));
        let row = policy.check_subscribe(&alice, "orders").unwrap().unwrap();
        assert!(row.matches(&json!({"owner_id": "alice"})));
        assert!(!row.matches(&json!({"owner_id": "bob"})));
    }

    #[test]
    fn rows_per_user_are_closed_to_anonymous_subscribers() {
        let file = "[[collections]]\nmatch = \"notes\"\nsubscribe = \"anyone\"\nrow_filter = \"owner = $sub\"";
        let policy = PolicyFile::parse(file).unwrap().policy().unwrap();
        assert!(matches!(
            policy.check_subscribe(&Principal::Anonymous, "notes"),
            Err(AuthError::Unauthenticated(_))
        ));
        let alice = user(json!({"sub": "alice"}));
        assert!(policy.check_subscribe(&alice, "notes").unwrap().is_some());
    }

    #[test]
    fn presence_follows_the_channel_and_the_presence_setting() {
        let policy = PolicyFile::parse(FILE).unwrap().policy().unwrap();
        let anon = Principal::Anonymous;
        let alice = user(json!({"sub": "alice"}));
        assert!(policy.check_presence(&alice, Some("orders")).is_ok());
        assert!(matches!(
            policy.check_presence(&alice, Some("secret")),
            Err(AuthError::Forbidden(_))
        ));
        assert!(policy.check_presence(&anon, Some("public.news")).is_ok());
        assert!(matches!(
            policy.check_presence(&anon, Some("posts")),
            Err(AuthError::Unauthenticated(_))
        ));
        // Connected at all: `authenticated` by default.
        assert_eq!(policy.presence, Access::Authenticated);
        assert!(policy.check_presence(&alice, None).is_ok());
        assert!(policy.check_presence(&anon, None).is_err());
        let billing = Principal::Service(Arc::new(
            policy.api_key("0123456789abcdef0123").unwrap().clone(),
        ));
        assert!(
            policy.check_presence(&billing, None).is_err(),
            "its subscribe list does not name presence"
        );

        let strict = format!("presence = \"claim:role=admin\"\n{FILE}");
        let policy = PolicyFile::parse(&strict).unwrap().policy().unwrap();
        let admin = user(json!({"sub": "root", "role": "admin"}));
        let refused = policy.check_presence(&alice, None).unwrap_err();
        assert!(
            refused.to_string().contains("see who is connected"),
            "{refused}"
        );
        assert!(policy.check_presence(&admin, None).is_ok());
        assert!(policy.check_presence(&alice, Some("orders")).is_ok());
        assert!(Policy::open().check_presence(&anon, None).is_ok());
    }

    #[test]
    fn bad_files_are_refused_with_reasons() {
        for (text, reason) in [
            (
                "[[collections]]\nmatch = \"x\"\nsubscribe = \"everyone\"",
                "unknown access",
            ),
            (
                "[[collections]]\nmatch = \"x\"\nrow_filter = \"a >\"",
                "row_filter",
            ),
            ("surprise = 1", "unknown field"),
            (
                "[[api_keys]]\nname = \"k\"\nkey = \"short\"",
                "shorter than 16",
            ),
            (
                "[[collections]]\nmatch = \"presence\"\nsubscribe = \"anyone\"",
                "reserved",
            ),
            ("presence = \"everyone\"", "unknown access"),
        ] {
            let error = PolicyFile::parse(text)
                .and_then(|f| f.policy())
                .unwrap_err()
                .to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("chat.*", "chat.room1"));
        assert!(!pattern_matches("chat.*", "chatroom"));
        assert!(pattern_matches("a*c", "abbc"));
        assert!(!pattern_matches("orders", "orders2"));
    }
}
