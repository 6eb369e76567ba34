//! Event sources of a function: brokers whose messages invoke it.

use crate::invocation::Period;
use crate::names::EnvName;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest `concurrency` of a source.
pub const MAX_SOURCE_CONCURRENCY: u32 = 256;
/// Largest `batch` of a source.
pub const MAX_BATCH: u32 = 1000;

/// Where a broker's address (and credentials) come from: written in the
/// manifest, or read from the node's environment so that secrets stay out
/// of the manifest, the registry and every listing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawUrl", into = "RawUrl")]
pub enum BrokerUrl {
    Literal(String),
    Env(EnvName),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUrl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url_env: Option<EnvName>,
}

impl TryFrom<RawUrl> for BrokerUrl {
    type Error = String;
    fn try_from(r: RawUrl) -> Result<Self, String> {
        match (r.url, r.url_env) {
            (Some(u), None) => Ok(Self::Literal(u)),
            (None, Some(e)) => Ok(Self::Env(e)),
            _ => Err("give the broker as url = \"...\" or url_env = \"VARIABLE\"".into()),
        }
    }
}

impl From<BrokerUrl> for RawUrl {
    fn from(u: BrokerUrl) -> Self {
        match u {
            BrokerUrl::Literal(url) => Self {
                url: Some(url),
                url_env: None,
            },
            BrokerUrl::Env(e) => Self {
                url: None,
                url_env: Some(e),
            },
        }
    }
}

/// A Redis stream read through a consumer group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStream {
    /// `redis://[user:password@]host[:port][/db]`, or `url_env`.
    #[serde(flatten)]
    pub url: BrokerUrl,
    pub stream: String,
    /// Consumer group (default `nimbus-<function>`); created at the end of
    /// the stream when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Entries pending longer than this in another consumer (one that
    /// crashed) are claimed (default 30s).
    #[serde(default = "default_claim_idle")]
    pub claim_idle: Period,
}

fn default_claim_idle() -> Period {
    Period::from_secs(30)
}

/// The broker of a source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SourceKind {
    RedisStream(RedisStream),
}

/// An event source of a function.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSource", into = "RawSource")]
pub struct Source {
    pub kind: SourceKind,
    /// Messages in flight at once (default 4; 1 keeps the stream's order).
    pub concurrency: u32,
    /// Messages fetched per read (default 16).
    pub batch: u32,
}

#[derive(Serialize, Deserialize)]
struct RawSource {
    #[serde(flatten)]
    kind: SourceKind,
    #[serde(default = "default_concurrency")]
    concurrency: u32,
    #[serde(default = "default_batch")]
    batch: u32,
}

fn default_concurrency() -> u32 {
    4
}
fn default_batch() -> u32 {
    16
}

impl TryFrom<RawSource> for Source {
    type Error = String;
    fn try_from(r: RawSource) -> Result<Self, String> {
        if r.concurrency == 0 || r.concurrency > MAX_SOURCE_CONCURRENCY {
            return Err(format!(
                "invalid source concurrency {}: use 1 to {MAX_SOURCE_CONCURRENCY}",
                r.concurrency
            ));
        }
        if r.batch == 0 || r.batch > MAX_BATCH {
            return Err(format!(
                "invalid source batch {}: use 1 to {MAX_BATCH}",
                r.batch
            ));
        }
        let SourceKind::RedisStream(s) = &r.kind;
        if s.stream.is_empty() {
            return Err("a redis-stream source needs a stream name".into());
        }
        if let BrokerUrl::Literal(u) = &s.url
            && !(u.starts_with("redis://") || u.starts_with("rediss://"))
        {
            return Err(format!(
                "invalid redis url `{}`: write redis://[user:password@]host[:port][/db]",
                redact(u)
            ));
        }
        Ok(Self {
            kind: r.kind,
            concurrency: r.concurrency,
            batch: r.batch,
        })
    }
}

impl From<Source> for RawSource {
    fn from(s: Source) -> Self {
        Self {
            kind: s.kind,
            concurrency: s.concurrency,
            batch: s.batch,
        }
    }
}

impl Source {
    /// What identifies the source across deploys (no credentials).
    pub fn key(&self) -> String {
        match &self.kind {
            SourceKind::RedisStream(s) => format!(
                "redis-stream:{}:{}",
                match &s.url {
                    BrokerUrl::Literal(u) => redact(u),
                    BrokerUrl::Env(e) => format!("${}", e.as_str()),
                },
                s.stream
            ),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// `url` without its password: `redis://user:secret@host` becomes
/// `redis://user:***@host`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_stream_sources_parse() {
        let s: Source = toml::from_str(
            "type = \"redis-stream\"\nurl = \"redis://127.0.0.1:6379\"\nstream = \"orders\"\nconcurrency = 1",
        )
        .unwrap();
        assert_eq!(s.concurrency, 1);
        assert_eq!(s.batch, 16);
        assert_eq!(s.key(), "redis-stream:redis://127.0.0.1:6379:orders");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), s);
        let e: Source =
            toml::from_str("type = \"redis-stream\"\nurl_env = \"REDIS_URL\"\nstream = \"s\"")
                .unwrap();
        assert!(e.key().contains("$REDIS_URL"));
    }

    #[test]
    fn bad_sources_are_refused() {
        for bad in [
            "type = \"kafka\"\nurl = \"x\"\nstream = \"s\"",
            "type = \"redis-stream\"\nurl = \"http://x\"\nstream = \"s\"",
            "type = \"redis-stream\"\nstream = \"s\"",
            "type = \"redis-stream\"\nurl = \"redis://x\"\nstream = \"s\"\nconcurrency = 0",
        ] {
            assert!(toml::from_str::<Source>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://app:hunter2@db:6379/1"),
            "redis://app:***@db:6379/1"
        );
        assert_eq!(redact("redis://db:6379"), "redis://db:6379");
    }
}
