//! Event sources of a function: brokers whose messages invoke it.

use crate::invocation::Period;
use crate::names::EnvName;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest `concurrency` of a source.
pub const MAX_SOURCE_CONCURRENCY: u32 = 256;
/// Largest `batch` of a source.
pub const MAX_BATCH: u32 = 1000;
/// Largest `events_per_invocation` of a source.
pub const MAX_EVENTS_PER_INVOCATION: u32 = 1000;
/// Most messages a source may run at once (`concurrency` times
/// `events_per_invocation`): what a consumer holds stays bounded.
pub const MAX_SOURCE_MESSAGES: u32 = 10_000;

/// Where a broker's address (and credentials) come from: written in the
/// manifest, or read on the node from its environment or from a secrets
/// file (as container platforms mount them), so that secrets stay out of
/// the manifest, the registry and every listing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawUrl", into = "RawUrl")]
pub enum BrokerUrl {
    Literal(String),
    Env(EnvName),
    /// An absolute path on the node; the file holds the URL.
    File(String),
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUrl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url_env: Option<EnvName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url_file: Option<String>,
}

impl TryFrom<RawUrl> for BrokerUrl {
    type Error = String;
    fn try_from(r: RawUrl) -> Result<Self, String> {
        match (r.url, r.url_env, r.url_file) {
            (Some(u), None, None) => Ok(Self::Literal(u)),
            (None, Some(e), None) => Ok(Self::Env(e)),
            (None, None, Some(f)) if f.starts_with('/') => Ok(Self::File(f)),
            (None, None, Some(f)) => Err(format!(
                "url_file `{f}` must be an absolute path on the node"
            )),
            _ => Err(
                "give the broker as one of url = \"...\", url_env = \"VARIABLE\" or url_file = \"/path/on/the/node\"".into(),
            ),
        }
    }
}

impl From<BrokerUrl> for RawUrl {
    fn from(u: BrokerUrl) -> Self {
        match u {
            BrokerUrl::Literal(url) => Self {
                url: Some(url),
                ..Self::default()
            },
            BrokerUrl::Env(e) => Self {
                url_env: Some(e),
                ..Self::default()
            },
            BrokerUrl::File(f) => Self {
                url_file: Some(f),
                ..Self::default()
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

/// A core NATS subject (with wildcards): at most once. A message published
/// while no node listens, or in flight when the node dies, is gone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    /// `nats://[user:password@|token@]host[:port]`, or `url_env`.
    #[serde(flatten)]
    pub url: BrokerUrl,
    pub subject: String,
    /// Queue group (default `nimbus-<function>`): nodes of one group share
    /// the messages instead of each receiving all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_group: Option<String>,
}

/// Where a new durable consumer starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// Messages published after the consumer was created.
    #[default]
    New,
    /// Every message the stream holds.
    All,
}

impl StartAt {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A NATS JetStream stream read by a durable pull consumer: at least once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStream {
    /// `nats://[user:password@|token@]host[:port]`, or `url_env`.
    #[serde(flatten)]
    pub url: BrokerUrl,
    /// The stream; it must exist (Nimbus does not create streams).
    pub stream: String,
    /// Durable consumer name (default `nimbus-<function>`); created when
    /// missing, deleted when the source is removed from the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Only messages on subjects matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_subject: Option<String>,
    /// Where a new consumer starts (default `new`).
    #[serde(default, skip_serializing_if = "StartAt::is_default")]
    pub start: StartAt,
    /// A delivered message not acknowledged within this is delivered again
    /// (default 30s). Nimbus reports progress while a function runs, so
    /// this bounds recovery after a crash, not a function's run time.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: Period,
}

fn default_ack_wait() -> Period {
    Period::from_secs(30)
}

/// MQTT topics read through a persistent session (MQTT 3.1.1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// `mqtt://[user:password@]host[:port]`, or `url_env`.
    #[serde(flatten)]
    pub url: BrokerUrl,
    /// Topic filters, with `+` for one level and a final `#` for the rest.
    pub topics: Vec<String>,
    /// 1 (default): at least once, acknowledged after the function
    /// succeeded; 0: at most once.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// The session's client id (default `nimbus-<function>`): the broker
    /// keeps messages for it while the node is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The protocol version spoken to the broker.
    #[serde(default, skip_serializing_if = "MqttVersion::is_default")]
    pub version: MqttVersion,
}

/// An MQTT protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MqttVersion {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5: flow control by the broker (receive maximum), user
    /// properties and the content type carried to the function.
    #[serde(rename = "5")]
    V5,
}

impl MqttVersion {
    fn is_default(&self) -> bool {
        *self == Self::V311
    }
}

fn default_qos() -> u8 {
    1
}

/// An MQTT topic filter: levels split by `/`, `+` alone in a level, `#`
/// alone in the last.
fn check_topic_filter(filter: &str) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let bad = filter.is_empty()
        || filter.len() > 65535
        || filter.contains('\0')
        || levels.iter().enumerate().any(|(i, l)| {
            (l.contains('+') && *l != "+")
                || (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
        });
    if bad {
        return Err(format!(
            "invalid mqtt topic filter `{filter}`: use levels split by /, with + for one level and a final # for the rest"
        ));
    }
    Ok(())
}

/// A RabbitMQ (AMQP 0-9-1) queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amqp {
    /// `amqp://[user:password@]host[:port][/vhost]`, or `url_env`.
    #[serde(flatten)]
    pub url: BrokerUrl,
    /// The queue; it must exist (Nimbus does not declare queues).
    pub queue: String,
}

/// A row operation captured from PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

fn all_operations() -> Vec<Operation> {
    vec![Operation::Insert, Operation::Update, Operation::Delete]
}

/// Changes to PostgreSQL tables, read from a logical replication slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// `postgres://user[:password]@host[:port]/database`, or `url_env`.
    #[serde(flatten)]
    pub url: BrokerUrl,
    /// Tables, as `schema.table` or `table` (schema `public`).
    pub tables: Vec<String>,
    /// Which changes to deliver (default all three).
    #[serde(default = "all_operations")]
    pub operations: Vec<Operation>,
    /// The replication slot and publication (default `nimbus_<function>`):
    /// created at deploy, dropped when the source is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
}

/// A PostgreSQL name Nimbus writes into SQL: letters, digits and `_`.
fn check_pg_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return Err(format!(
            "invalid {what} `{name}`: use letters, digits and _ (at most 63, not starting with a digit)"
        ));
    }
    Ok(())
}

/// The broker of a source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SourceKind {
    RedisStream(RedisStream),
    Nats(Nats),
    #[serde(rename = "jetstream")]
    JetStream(JetStream),
    Mqtt(Mqtt),
    Postgres(Postgres),
    Amqp(Amqp),
}

/// A NATS subject: dot-separated tokens, `*` and a final `>` as wildcards,
/// no spaces.
fn check_subject(what: &str, subject: &str, wildcards: bool) -> Result<(), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let bad = subject.is_empty()
        || subject.chars().any(|c| c.is_whitespace() || c.is_control())
        || tokens.iter().any(|t| t.is_empty())
        || tokens.iter().enumerate().any(|(i, t)| {
            (t.contains('*') && *t != "*")
                || (t.contains('>') && (*t != ">" || i + 1 != tokens.len()))
                || (!wildcards && (*t == "*" || *t == ">"))
        });
    if bad {
        return Err(format!(
            "invalid {what} `{subject}`: use dot-separated tokens such as orders.created{}",
            if wildcards {
                ", with * for one token and a final > for the rest"
            } else {
                " (no wildcards)"
            }
        ));
    }
    Ok(())
}

/// `value` must lie within `min..=max`.
fn check_period(what: &str, value: Period, min: Period, max: Period) -> Result<(), String> {
    if value.get() < min.get() || value.get() > max.get() {
        return Err(format!("invalid {what} {value}: use {min} to {max}"));
    }
    Ok(())
}

impl SourceKind {
    fn validate(&self) -> Result<(), String> {
        let scheme = |url: &BrokerUrl, schemes: &[&str], form: &str| match url {
            BrokerUrl::Literal(u) if !schemes.iter().any(|s| u.starts_with(s)) => {
                Err(format!("invalid broker url `{}`: write {form}", redact(u)))
            }
            _ => Ok(()),
        };
        match self {
            SourceKind::RedisStream(s) => {
                if s.stream.is_empty() {
                    return Err("a redis-stream source needs a stream name".into());
                }
                check_period(
                    "claim_idle",
                    s.claim_idle,
                    Period::from_secs(1),
                    Period::from_secs(86_400),
                )?;
                scheme(
                    &s.url,
                    &["redis://", "rediss://"],
                    "redis://[user:password@]host[:port][/db]",
                )
            }
            SourceKind::Nats(s) => {
                check_subject("subject", &s.subject, true)?;
                if let Some(q) = &s.queue_group {
                    check_subject("queue group", q, false)?;
                }
                scheme(&s.url, &["nats://"], "nats://[user:password@]host[:port]")
            }
            SourceKind::JetStream(s) => {
                for (what, name) in [
                    ("stream", Some(&s.stream)),
                    ("consumer", s.consumer.as_ref()),
                ] {
                    if let Some(n) = name
                        && (n.is_empty()
                            || !n
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                    {
                        return Err(format!(
                            "invalid jetstream {what} name `{n}`: use letters, digits, - and _"
                        ));
                    }
                }
                if let Some(f) = &s.filter_subject {
                    check_subject("filter_subject", f, true)?;
                }
                check_period(
                    "ack_wait",
                    s.ack_wait,
                    Period::from_secs(1),
                    Period::from_secs(12 * 3600),
                )?;
                scheme(&s.url, &["nats://"], "nats://[user:password@]host[:port]")
            }
            SourceKind::Mqtt(s) => {
                if s.topics.is_empty() {
                    return Err("an mqtt source needs at least one topic filter".into());
                }
                for t in &s.topics {
                    check_topic_filter(t)?;
                }
                if s.qos > 1 {
                    return Err(format!(
                        "invalid mqtt qos {}: use 1 (at least once) or 0 (at most once)",
                        s.qos
                    ));
                }
                if let Some(id) = &s.client_id
                    && (id.is_empty() || id.len() > 64)
                {
                    return Err(format!(
                        "invalid mqtt client_id `{id}`: use 1 to 64 characters"
                    ));
                }
                scheme(&s.url, &["mqtt://"], "mqtt://[user:password@]host[:port]")
            }
            SourceKind::Amqp(s) => {
                if s.queue.is_empty()
                    || s.queue.len() > 255
                    || s.queue.chars().any(|c| c.is_control())
                {
                    return Err(format!(
                        "invalid amqp queue name `{}`: use 1 to 255 printable characters",
                        s.queue
                    ));
                }
                scheme(
                    &s.url,
                    &["amqp://"],
                    "amqp://[user:password@]host[:port][/vhost]",
                )
            }
            SourceKind::Postgres(s) => {
                if s.tables.is_empty() {
                    return Err("a postgres source needs at least one table".into());
                }
                for t in &s.tables {
                    for part in t.split('.') {
                        check_pg_name("table name", part)?;
                    }
                    if t.split('.').count() > 2 {
                        return Err(format!("invalid table `{t}`: write table or schema.table"));
                    }
                }
                if s.operations.is_empty() {
                    return Err(
                        "a postgres source needs at least one operation (insert, update, delete)"
                            .into(),
                    );
                }
                if let Some(slot) = &s.slot {
                    check_pg_name("slot name", slot)?;
                    if slot.chars().any(|c| c.is_ascii_uppercase()) {
                        return Err(format!("invalid slot name `{slot}`: use lowercase letters"));
                    }
                }
                scheme(
                    &s.url,
                    &["postgres://", "postgresql://"],
                    "postgres://user[:password]@host[:port]/database",
                )
            }
        }
    }
}

/// What a source's messages are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Each message is one event, passed on as it is.
    #[default]
    Message,
    /// Each message is an S3 event notification (as S3 and MinIO send
    /// them); every record in it becomes one `object.created` or
    /// `object.deleted` event.
    S3,
}

impl Format {
    pub(crate) fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// An event source of a function.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSource", into = "RawSource")]
pub struct Source {
    pub kind: SourceKind,
    /// Messages in flight at once (default 4, and 1 for PostgreSQL, whose
    /// changes then keep commit order; 1 keeps any source's order).
    pub concurrency: u32,
    /// Messages fetched per read (default 16).
    pub batch: u32,
    /// Most messages one invocation receives (default 1: each message is
    /// an invocation of its own, a CloudEvent in binary mode). Above 1,
    /// messages that are waiting together go to one invocation as a
    /// CloudEvents batch (a JSON array of structured events), and up to
    /// `concurrency` such invocations run at once.
    pub events_per_invocation: u32,
    pub format: Format,
}

#[derive(Serialize, Deserialize)]
struct RawSource {
    #[serde(flatten)]
    kind: SourceKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    events_per_invocation: Option<u32>,
    #[serde(default, skip_serializing_if = "Format::is_default")]
    format: Format,
}

/// Messages in flight when the manifest does not say: a change stream is
/// delivered in commit order unless asked otherwise; other brokers run a
/// few at once.
fn default_concurrency(kind: &SourceKind) -> u32 {
    match kind {
        SourceKind::Postgres(_) => 1,
        _ => 4,
    }
}
/// Messages fetched per read when the manifest does not say: JetStream
/// pulls in larger batches (NATS's own clients pull 500 at a time), which
/// amortises a pull's round trip; other brokers push or read cheaply.
fn default_batch(kind: &SourceKind) -> u32 {
    match kind {
        SourceKind::JetStream(_) => 128,
        _ => 16,
    }
}

impl TryFrom<RawSource> for Source {
    type Error = String;
    fn try_from(r: RawSource) -> Result<Self, String> {
        let concurrency = r
            .concurrency
            .unwrap_or_else(|| default_concurrency(&r.kind));
        if concurrency == 0 || concurrency > MAX_SOURCE_CONCURRENCY {
            return Err(format!(
                "invalid source concurrency {concurrency}: use 1 to {MAX_SOURCE_CONCURRENCY}"
            ));
        }
        let batch = r.batch.unwrap_or_else(|| default_batch(&r.kind));
        if batch == 0 || batch > MAX_BATCH {
            return Err(format!(
                "invalid source batch {batch}: use 1 to {MAX_BATCH}"
            ));
        }
        let events_per_invocation = r.events_per_invocation.unwrap_or(1);
        if events_per_invocation == 0 || events_per_invocation > MAX_EVENTS_PER_INVOCATION {
            return Err(format!(
                "invalid source events_per_invocation {events_per_invocation}: use 1 to {MAX_EVENTS_PER_INVOCATION}"
            ));
        }
        if concurrency.saturating_mul(events_per_invocation) > MAX_SOURCE_MESSAGES {
            return Err(format!(
                "a source may run at most {MAX_SOURCE_MESSAGES} messages at once, and concurrency {concurrency} times events_per_invocation {events_per_invocation} is more: lower one of them"
            ));
        }
        r.kind.validate()?;
        if r.format == Format::S3 && matches!(r.kind, SourceKind::Postgres(_)) {
            return Err(
                "format = \"s3\" is for brokers that carry S3 notifications, not for postgres"
                    .into(),
            );
        }
        Ok(Self {
            kind: r.kind,
            concurrency,
            batch,
            events_per_invocation,
            format: r.format,
        })
    }
}

impl From<Source> for RawSource {
    fn from(s: Source) -> Self {
        Self {
            kind: s.kind,
            concurrency: Some(s.concurrency),
            batch: Some(s.batch),
            events_per_invocation: (s.events_per_invocation > 1).then_some(s.events_per_invocation),
            format: s.format,
        }
    }
}

impl Source {
    /// Messages the consumer runs at once: `concurrency` invocations of up
    /// to `events_per_invocation` messages each.
    pub fn messages_at_once(&self) -> u32 {
        self.concurrency.saturating_mul(self.events_per_invocation)
    }

    /// What identifies the source across deploys (no credentials).
    pub fn key(&self) -> String {
        let shown = |url: &BrokerUrl| match url {
            BrokerUrl::Literal(u) => redact(u),
            BrokerUrl::Env(e) => format!("${}", e.as_str()),
            BrokerUrl::File(f) => format!("file:{f}"),
        };
        match &self.kind {
            SourceKind::RedisStream(s) => format!("redis-stream:{}:{}", shown(&s.url), s.stream),
            SourceKind::Nats(s) => format!("nats:{}:{}", shown(&s.url), s.subject),
            SourceKind::JetStream(s) => format!(
                "jetstream:{}:{}{}",
                shown(&s.url),
                s.stream,
                s.consumer
                    .as_deref()
                    .map(|c| format!(":{c}"))
                    .unwrap_or_default()
            ),
            SourceKind::Amqp(s) => format!("amqp:{}:{}", shown(&s.url), s.queue),
            // The slot, not its tables: changing them keeps the slot's
            // position.
            SourceKind::Postgres(s) => format!(
                "postgres:{}{}",
                shown(&s.url),
                s.slot
                    .as_deref()
                    .map(|c| format!(":{c}"))
                    .unwrap_or_default()
            ),
            // The session, not its topics: changing the topics keeps the
            // session (and what the broker holds for it).
            SourceKind::Mqtt(s) => format!(
                "mqtt:{}{}",
                shown(&s.url),
                s.client_id
                    .as_deref()
                    .map(|c| format!(":{c}"))
                    .unwrap_or_default()
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
/// `redis://user:***@host`, and `nats://token@host` becomes
/// `nats://***@host`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        // A userinfo without `:` is a token or a password alone.
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => format!("{scheme}://***@{host}{path}"),
        },
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
        assert_eq!((s.events_per_invocation, s.messages_at_once()), (1, 1));
        let b: Source = toml::from_str(
            "type = \"redis-stream\"\nurl = \"redis://h\"\nstream = \"s\"\nconcurrency = 4\nevents_per_invocation = 25",
        )
        .unwrap();
        assert_eq!((b.events_per_invocation, b.messages_at_once()), (25, 100));
        assert_eq!(
            serde_json::from_str::<Source>(&serde_json::to_string(&b).unwrap()).unwrap(),
            b
        );
        assert_eq!(s.format, Format::Message);
        assert_eq!(s.key(), "redis-stream:redis://127.0.0.1:6379:orders");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), s);
        let e: Source =
            toml::from_str("type = \"redis-stream\"\nurl_env = \"REDIS_URL\"\nstream = \"s\"")
                .unwrap();
        assert!(e.key().contains("$REDIS_URL"));
        let f: Source = toml::from_str(
            "type = \"redis-stream\"\nurl_file = \"/run/secrets/redis\"\nstream = \"s\"",
        )
        .unwrap();
        assert_eq!(f.key(), "redis-stream:file:/run/secrets/redis:s");
        assert_eq!(
            serde_json::from_str::<Source>(&serde_json::to_string(&f).unwrap()).unwrap(),
            f
        );
    }

    #[test]
    fn bad_sources_are_refused() {
        for bad in [
            "type = \"kafka\"\nurl = \"x\"\nstream = \"s\"",
            "type = \"redis-stream\"\nurl = \"http://x\"\nstream = \"s\"",
            "type = \"redis-stream\"\nstream = \"s\"",
            "type = \"redis-stream\"\nurl_file = \"secrets/redis\"\nstream = \"s\"",
            "type = \"redis-stream\"\nurl = \"redis://h\"\nurl_env = \"X\"\nstream = \"s\"",
            "type = \"redis-stream\"\nurl = \"redis://x\"\nstream = \"s\"\nconcurrency = 0",
            "type = \"redis-stream\"\nurl = \"redis://x\"\nstream = \"s\"\nevents_per_invocation = 0",
            "type = \"redis-stream\"\nurl = \"redis://x\"\nstream = \"s\"\nevents_per_invocation = 1001",
            "type = \"redis-stream\"\nurl = \"redis://x\"\nstream = \"s\"\nconcurrency = 64\nevents_per_invocation = 200",
        ] {
            assert!(toml::from_str::<Source>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nats_sources_parse() {
        let s: Source = toml::from_str(
            "type = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\nstream = \"ORDERS\"\nfilter_subject = \"orders.*\"\nstart = \"all\"\nack_wait = \"5s\"",
        )
        .unwrap();
        let SourceKind::JetStream(j) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!(j.start, StartAt::All);
        assert_eq!(j.ack_wait.get(), std::time::Duration::from_secs(5));
        assert_eq!(s.key(), "jetstream:nats://127.0.0.1:4222:ORDERS");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), s);
        let n: Source =
            toml::from_str("type = \"nats\"\nurl = \"nats://h\"\nsubject = \"a.*.>\"").unwrap();
        assert_eq!(n.key(), "nats:nats://h:a.*.>");
        let m: Source = toml::from_str(
            "type = \"mqtt\"\nurl = \"mqtt://h:1883\"\ntopics = [\"sensors/+/temp\", \"alerts/#\"]",
        )
        .unwrap();
        assert_eq!(m.key(), "mqtt:mqtt://h:1883");
        let s3: Source = toml::from_str(
            "type = \"nats\"\nurl = \"nats://h\"\nsubject = \"minio.events\"\nformat = \"s3\"",
        )
        .unwrap();
        assert_eq!(s3.format, Format::S3);
        assert_eq!(
            serde_json::from_str::<Source>(&serde_json::to_string(&s3).unwrap()).unwrap(),
            s3
        );
        let p: Source = toml::from_str(
            "type = \"postgres\"\nurl = \"postgres://app:pw@h/shop\"\ntables = [\"public.orders\", \"items\"]\noperations = [\"insert\"]",
        )
        .unwrap();
        assert_eq!(p.key(), "postgres:postgres://app:***@h/shop");
        // A change stream keeps commit order unless asked for more at once.
        assert_eq!(p.concurrency, 1);
        let q: Source = toml::from_str(
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = [\"t\"]\nconcurrency = 8",
        )
        .unwrap();
        assert_eq!(q.concurrency, 8);
        assert_eq!(
            serde_json::from_str::<Source>(&serde_json::to_string(&q).unwrap()).unwrap(),
            q
        );
        let a: Source =
            toml::from_str("type = \"amqp\"\nurl = \"amqp://guest:guest@h/\"\nqueue = \"jobs\"")
                .unwrap();
        assert_eq!(a.key(), "amqp:amqp://guest:***@h/:jobs");
        assert_eq!(a.concurrency, 4);
        for bad in [
            "type = \"nats\"\nurl = \"nats://h\"\nsubject = \"a..b\"",
            "type = \"nats\"\nurl = \"nats://h\"\nsubject = \"a.>.b\"",
            "type = \"nats\"\nurl = \"nats://h\"\nsubject = \"a b\"",
            "type = \"nats\"\nurl = \"redis://h\"\nsubject = \"a\"",
            "type = \"jetstream\"\nurl = \"nats://h\"\nstream = \"a.b\"",
            "type = \"jetstream\"\nurl = \"nats://h\"\nstream = \"S\"\nstart = \"middle\"",
            "type = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = []",
            "type = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a/#/b\"]",
            "type = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a+\"]",
            "type = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nqos = 2",
            "type = \"mqtt\"\nurl = \"nats://h\"\ntopics = [\"a\"]",
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = []",
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = [\"t\"]\nformat = \"s3\"",
            "type = \"nats\"\nurl = \"nats://h\"\nsubject = \"s\"\nformat = \"xml\"",
            "type = \"amqp\"\nurl = \"amqp://h\"\nqueue = \"\"",
            "type = \"jetstream\"\nurl = \"nats://h\"\nstream = \"S\"\nack_wait = \"0s\"",
            "type = \"redis-stream\"\nurl = \"redis://h\"\nstream = \"s\"\nclaim_idle = \"0s\"",
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = [\"t\"]\npoll = \"0ms\"",
            "type = \"amqp\"\nurl = \"http://h\"\nqueue = \"q\"",
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = [\"a;drop\"]",
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = [\"t\"]\nslot = \"Bad\"",
            "type = \"postgres\"\nurl = \"postgres://h/db\"\ntables = [\"t\"]\noperations = [\"truncate\"]",
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
        assert_eq!(redact("nats://s3cret@h:4222"), "nats://***@h:4222");
    }
}
