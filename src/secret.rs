//! Secrets from the configuration: a literal or `{"env":"VAR"}`, redacted wherever printed.
//!
//! `Secret` never shows its value through `Debug`, `Display` or `Serialize`-for-display paths;
//! the only way to read it is [`Secret::expose`], which the egress calls when it builds a request.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a secret's value comes from, as written in the configuration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SecretSource {
    /// `{"env":"VAR"}`: read from the environment when used.
    Env { env: String },
    /// A literal string.
    Literal(String),
}

/// A secret value. Prints as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretSource);

/// A secret named an environment variable that is not set (or not UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var} (named by a secret) is not set")]
pub struct MissingSecret {
    pub var: String,
}

impl Secret {
    pub fn literal(value: impl Into<String>) -> Self {
        Secret(SecretSource::Literal(value.into()))
    }

    pub fn from_env(var: impl Into<String>) -> Self {
        Secret(SecretSource::Env { env: var.into() })
    }

    pub fn source(&self) -> &SecretSource {
        &self.0
    }

    /// The secret's value. Callers must not log it.
    pub fn expose(&self) -> Result<String, MissingSecret> {
        match &self.0 {
            SecretSource::Literal(s) => Ok(s.clone()),
            SecretSource::Env { env } => {
                std::env::var(env).map_err(|_| MissingSecret { var: env.clone() })
            }
        }
    }

    /// The form shown by the API and `validate`: the env var's name, or `"<redacted>"`.
    pub fn redacted_json(&self) -> serde_json::Value {
        match &self.0 {
            SecretSource::Env { env } => serde_json::json!({ "env": env }),
            SecretSource::Literal(_) => serde_json::Value::String("<redacted>".into()),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            SecretSource::Env { env } => write!(f, "Secret(env:{env})"),
            SecretSource::Literal(_) => f.write_str("Secret(<redacted>)"),
        }
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::literal("canary-4f1d");
        assert!(!format!("{s:?} {s}").contains("canary"));
        assert_eq!(s.expose().unwrap(), "canary-4f1d");
    }

    #[test]
    fn env_secret_reads_the_environment() {
        let s: Secret =
            serde_json::from_str(r#"{"env":"STREAMDEST_TEST_SECRET_UNSET_VAR"}"#).unwrap();
        assert_eq!(
            s.expose(),
            Err(MissingSecret {
                var: "STREAMDEST_TEST_SECRET_UNSET_VAR".into()
            })
        );
    }
}
