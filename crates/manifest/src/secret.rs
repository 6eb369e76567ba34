//! Secrets: environment variables of a function whose values live on the
//! node (its environment or a file), never in the manifest, the registry
//! or a deploy request, and are redacted from everything Nimbus shows.

use crate::names::EnvName;
use serde::{Deserialize, Serialize};

/// Where a secret's value is read on the node, when a version is prepared.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSecret", into = "RawSecret")]
pub enum SecretSource {
    /// An environment variable of the node.
    Env(EnvName),
    /// A file on the node (an absolute path, such as a mounted secret);
    /// one trailing newline is dropped.
    File(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<EnvName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

impl TryFrom<RawSecret> for SecretSource {
    type Error = String;
    fn try_from(r: RawSecret) -> Result<Self, String> {
        match (r.env, r.file) {
            (Some(e), None) => Ok(Self::Env(e)),
            (None, Some(f)) if f.starts_with('/') => Ok(Self::File(f)),
            (None, Some(f)) => Err(format!(
                "invalid secret file `{f}`: write an absolute path on the node, e.g. /run/secrets/api-key"
            )),
            _ => Err(
                "a secret is { env = \"VARIABLE\" } (the node's environment) or { file = \"/path\" } (a file on the node)"
                    .into(),
            ),
        }
    }
}

impl From<SecretSource> for RawSecret {
    fn from(s: SecretSource) -> Self {
        match s {
            SecretSource::Env(e) => Self {
                env: Some(e),
                file: None,
            },
            SecretSource::File(f) => Self {
                env: None,
                file: Some(f),
            },
        }
    }
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(e) => write!(f, "the node's environment variable {}", e.as_str()),
            Self::File(p) => write!(f, "the file {p} on the node"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn secrets_name_where_their_value_is() {
        let m: BTreeMap<EnvName, SecretSource> =
            toml::from_str("A = { env = \"NODE_A\" }\nB = { file = \"/run/secrets/b\" }").unwrap();
        assert_eq!(m.len(), 2);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"A":{"env":"NODE_A"},"B":{"file":"/run/secrets/b"}}"#
        );
        for (bad, says) in [
            ("A = { file = \"rel\" }", "absolute path"),
            ("A = { env = \"X\", file = \"/f\" }", "a secret is"),
            ("A = { value = \"x\" }", "unknown field"),
            ("A = \"literal\"", "invalid type"),
        ] {
            let e = toml::from_str::<BTreeMap<EnvName, SecretSource>>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
