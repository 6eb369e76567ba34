//! MQTT 3.1.1 and MQTT 5 topics through a persistent session.
//!
//! The consumer connects with a fixed client id and `clean session` off, so
//! the broker keeps its subscriptions and queues QoS 1 messages for it while
//! the node is down. A QoS 1 message is acknowledged (PUBACK) once its
//! function succeeded or it was dead-lettered; failures are retried in place
//! meanwhile. Acknowledgements go out in the order the messages arrived, as
//! the protocol asks, whatever order the functions finish in. A message left
//! unacknowledged (the node died, or the function was not serving) is sent
//! again by the broker when the session reconnects.
//!
//! Order: with `concurrency = 1`, messages of a topic run in the order the
//! broker sends them.
//!
//! MQTT 5 (`version = "5"`) differs where it helps: the session never
//! expires (Session Expiry Interval at its maximum, what 3.1.1's persistent
//! session means), the broker sends at most `concurrency` unacknowledged
//! messages (Receive Maximum), and a message's content type and its
//! `traceparent` / `tracestate` user properties reach the function as
//! headers, its other user properties as `mqtt-property-<name>` headers.

use crate::wire::{Url, bad_url};
use crate::{BoxFuture, Deliver, EventSource, Message, SourceError, StatusCell, Verdict};
use nimbus_manifest::{Mqtt, MqttVersion};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;

/// Longest a connection attempt (and the CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The keep-alive the session asks for: the broker drops it after 1.5× of
/// silence, and this side pings at half of it.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Largest packet accepted from a broker.
const MAX_PACKET: usize = 64 << 20;

/// Where to connect and how to log in, parsed from `mqtt://` URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Target {
    /// Parses `mqtt://[user[:password]@]host[:port]`.
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let u = Url::parse(url, &["mqtt://"], "mqtt", "mqtt://host:port", 1883)?;
        if !u.path.trim_matches('/').is_empty() {
            return Err(bad_url("mqtt", url, "an mqtt url has no path"));
        }
        Ok(Self {
            host: u.host,
            port: u.port,
            user: u.user,
            password: u.password,
        })
    }
}

/// A packet from the broker.
#[derive(Debug, PartialEq, Eq)]
enum Packet {
    ConnAck {
        code: u8,
        properties: Properties,
    },
    Publish {
        dup: bool,
        qos: u8,
        topic: String,
        id: Option<u16>,
        properties: Properties,
        payload: Vec<u8>,
    },
    SubAck {
        codes: Vec<u8>,
    },
    /// PUBACK, PINGRESP and others this consumer needs not act on.
    Other,
}

/// The MQTT 5 properties a consumer uses; the others are skipped.
#[derive(Debug, Default, PartialEq, Eq)]
struct Properties {
    content_type: Option<String>,
    reason: Option<String>,
    user: Vec<(String, String)>,
}

fn short() -> SourceError {
    SourceError::Protocol("a packet from the broker is cut short".into())
}

/// A variable byte integer at `at`, advancing it.
fn varint(b: &[u8], at: &mut usize) -> Result<usize, SourceError> {
    let mut value = 0usize;
    for shift in 0..4 {
        let byte = *b.get(*at).ok_or_else(short)?;
        *at += 1;
        value |= ((byte & 0x7f) as usize) << (7 * shift);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(SourceError::Protocol("a malformed variable length".into()))
}

/// A length-prefixed string or binary value at `at`, advancing it.
fn take<'a>(b: &'a [u8], at: &mut usize) -> Result<&'a [u8], SourceError> {
    let len = u16::from_be_bytes([
        *b.get(*at).ok_or_else(short)?,
        *b.get(*at + 1).ok_or_else(short)?,
    ]) as usize;
    let value = b.get(*at + 2..*at + 2 + len).ok_or_else(short)?;
    *at += 2 + len;
    Ok(value)
}

fn text(b: &[u8], at: &mut usize) -> Result<String, SourceError> {
    take(b, at).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The MQTT 5 property block at `at`, advancing past it.
fn properties(b: &[u8], at: &mut usize) -> Result<Properties, SourceError> {
    let len = varint(b, at)?;
    let end = *at + len;
    if end > b.len() {
        return Err(short());
    }
    let mut p = Properties::default();
    while *at < end {
        let id = b[*at];
        *at += 1;
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => *at += 1,
            0x13 | 0x21 | 0x22 | 0x23 => *at += 2,
            0x02 | 0x11 | 0x18 | 0x27 => *at += 4,
            0x0B => {
                varint(b, at)?;
            }
            0x03 => p.content_type = Some(text(b, at)?),
            0x1F => p.reason = Some(text(b, at)?),
            0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C => {
                take(b, at)?;
            }
            0x26 => {
                let k = text(b, at)?;
                let v = text(b, at)?;
                p.user.push((k, v));
            }
            other => {
                return Err(SourceError::Protocol(format!(
                    "an unknown MQTT 5 property {other:#04x}"
                )));
            }
        }
    }
    if *at != end {
        return Err(SourceError::Protocol("a malformed property block".into()));
    }
    Ok(p)
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet: its first byte, the remaining length, the rest.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// CONNECT. A session that is not clean is kept by the broker while the
/// node is away; `receive_max` bounds the unacknowledged messages an MQTT 5
/// broker sends.
fn connect_packet(
    target: &Target,
    client_id: &str,
    clean: bool,
    version: MqttVersion,
    receive_max: u16,
) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(match version {
        MqttVersion::V311 => 4,
        MqttVersion::V5 => 5,
    });
    let mut flags = if clean { 0x02 } else { 0 };
    if target.user.is_some() {
        flags |= 0x80;
    }
    if target.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&(KEEP_ALIVE.as_secs() as u16).to_be_bytes());
    if version == MqttVersion::V5 {
        let expiry: u32 = if clean { 0 } else { u32::MAX };
        let mut props = vec![0x11];
        props.extend_from_slice(&expiry.to_be_bytes());
        props.push(0x21);
        props.extend_from_slice(&receive_max.max(1).to_be_bytes());
        body.push(props.len() as u8);
        body.extend_from_slice(&props);
    }
    put_str(&mut body, client_id.as_bytes());
    if let Some(u) = &target.user {
        put_str(&mut body, u.as_bytes());
    }
    if let Some(p) = &target.password {
        put_str(&mut body, p.as_bytes());
    }
    frame(0x10, &body)
}

fn subscribe_packet(id: u16, filters: &[String], qos: u8, version: MqttVersion) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == MqttVersion::V5 {
        body.push(0); // no properties
    }
    for f in filters {
        put_str(&mut body, f.as_bytes());
        body.push(qos);
    }
    frame(0x82, &body)
}

fn puback_packet(id: u16) -> Vec<u8> {
    frame(0x40, &id.to_be_bytes())
}

/// Decodes a packet body given its first byte.
fn decode(first: u8, body: Vec<u8>, version: MqttVersion) -> Result<Packet, SourceError> {
    let v5 = version == MqttVersion::V5;
    let u16_at = |b: &[u8], at: usize| -> Result<u16, SourceError> {
        Ok(u16::from_be_bytes([
            *b.get(at).ok_or_else(short)?,
            *b.get(at + 1).ok_or_else(short)?,
        ]))
    };
    Ok(match first >> 4 {
        2 => {
            let code = *body.get(1).ok_or_else(short)?;
            let mut at = 2;
            // A refusal may come in the other version's shape.
            let properties = if v5 && body.len() > 2 {
                properties(&body, &mut at)?
            } else {
                Properties::default()
            };
            Packet::ConnAck { code, properties }
        }
        3 => {
            let qos = (first >> 1) & 0x03;
            let mut at = 0;
            let topic = text(&body, &mut at)?;
            let id = if qos > 0 {
                at += 2;
                Some(u16_at(&body, at - 2)?)
            } else {
                None
            };
            let properties = if v5 {
                properties(&body, &mut at)?
            } else {
                Properties::default()
            };
            Packet::Publish {
                dup: first & 0x08 != 0,
                qos,
                topic,
                id,
                properties,
                payload: body.get(at..).ok_or_else(short)?.to_vec(),
            }
        }
        9 => {
            let mut at = 2;
            if v5 {
                properties(&body, &mut at)?;
            }
            Packet::SubAck {
                codes: body.get(at..).ok_or_else(short)?.to_vec(),
            }
        }
        _ => Packet::Other,
    })
}

async fn read_packet(
    read: &mut OwnedReadHalf,
    version: MqttVersion,
) -> Result<Packet, SourceError> {
    let broken = |e: std::io::Error| SourceError::Disconnected(e.to_string());
    let first = read.read_u8().await.map_err(broken)?;
    let mut len = 0usize;
    for shift in 0..4 {
        let byte = read.read_u8().await.map_err(broken)?;
        len |= ((byte & 0x7f) as usize) << (7 * shift);
        if byte & 0x80 == 0 {
            break;
        }
        if shift == 3 {
            return Err(SourceError::Protocol("a packet length is malformed".into()));
        }
    }
    if len > MAX_PACKET {
        return Err(SourceError::Protocol(format!(
            "a packet of {len} bytes is too large"
        )));
    }
    let mut body = vec![0; len];
    read.read_exact(&mut body).await.map_err(broken)?;
    decode(first, body, version)
}

/// How a session connects.
#[derive(Clone, Copy)]
struct Session<'a> {
    client_id: &'a str,
    clean: bool,
    version: MqttVersion,
    receive_max: u16,
}

/// Connects and completes the CONNECT / CONNACK exchange.
async fn open(
    target: &Target,
    session: Session<'_>,
) -> Result<(OwnedReadHalf, OwnedWriteHalf), SourceError> {
    let addr = format!("{}:{}", target.host, target.port);
    let handshake = async {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| SourceError::Unreachable(format!("{addr} ({e})")))?;
        let _ = stream.set_nodelay(true);
        let (mut read, mut write) = stream.into_split();
        let connect = connect_packet(
            target,
            session.client_id,
            session.clean,
            session.version,
            session.receive_max,
        );
        write
            .write_all(&connect)
            .await
            .map_err(|e| SourceError::Disconnected(e.to_string()))?;
        let v5 = session.version == MqttVersion::V5;
        match read_packet(&mut read, session.version).await? {
            Packet::ConnAck { code: 0, .. } => Ok((read, write)),
            Packet::ConnAck { code, properties } => {
                let why = properties
                    .reason
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                Err(match (v5, code) {
                    (false, 4 | 5) | (true, 0x86 | 0x87) => {
                        SourceError::Auth(format!("{addr} refused the user name or password{why}"))
                    }
                    (false, 1) | (true, 0x84) => SourceError::Server(format!(
                        "{addr} does not speak MQTT {}; set version = \"{}\" on the source",
                        if v5 { "5" } else { "3.1.1" },
                        if v5 { "3.1.1" } else { "5" },
                    )),
                    _ => SourceError::Server(format!(
                        "{addr} refused the connection (code {code:#04x}){why}"
                    )),
                })
            }
            _ => Err(SourceError::Protocol(format!(
                "{addr} did not answer as an MQTT broker"
            ))),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| SourceError::Unreachable(format!("{addr} (timed out)")))?
}

/// A QoS 1 publisher for tools and benchmarks: each message is
/// acknowledged by the broker before the next is sent.
pub struct Publisher {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    next: u16,
}

impl Publisher {
    pub async fn connect(url: &str, client_id: &str) -> Result<Self, SourceError> {
        let session = Session {
            client_id,
            clean: true,
            version: MqttVersion::V311,
            receive_max: u16::MAX,
        };
        let (read, write) = open(&Target::parse(url)?, session).await?;
        Ok(Self {
            read,
            write,
            next: 0,
        })
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), SourceError> {
        self.next = self.next.checked_add(1).unwrap_or(1);
        let mut body = Vec::new();
        put_str(&mut body, topic.as_bytes());
        body.extend_from_slice(&self.next.to_be_bytes());
        body.extend_from_slice(payload);
        self.write
            .write_all(&frame(0x32, &body))
            .await
            .map_err(|e| SourceError::Disconnected(e.to_string()))?;
        // The PUBACK (the only packet a publisher is sent).
        read_packet(&mut self.read, MqttVersion::V311)
            .await
            .map(|_| ())
    }
}

/// QoS 1 messages received and not yet acknowledged, in arrival order: an
/// acknowledgement goes out once every message before it is done too.
#[derive(Default)]
struct AckOrder(VecDeque<(u16, bool)>);

impl AckOrder {
    fn received(&mut self, id: u16) {
        self.0.push_back((id, false));
    }

    /// Marks `id` done; returns the ids now ready to acknowledge, in order.
    fn done(&mut self, id: u16) -> Vec<u16> {
        if let Some(slot) = self.0.iter_mut().find(|(i, d)| *i == id && !d) {
            slot.1 = true;
        }
        let mut ready = Vec::new();
        while let Some((id, true)) = self.0.front().copied() {
            self.0.pop_front();
            ready.push(id);
        }
        ready
    }
}

/// An MQTT subscription for one function.
pub struct MqttSource {
    function: String,
    target: Target,
    topics: Vec<String>,
    qos: u8,
    client_id: String,
    concurrency: u32,
    version: MqttVersion,
    ce_source: String,
}

impl MqttSource {
    pub fn new(
        function: &str,
        url: &str,
        config: &Mqtt,
        concurrency: u32,
    ) -> Result<Self, SourceError> {
        let target = Target::parse(url)?;
        Ok(Self {
            function: function.to_owned(),
            ce_source: format!("mqtt://{}:{}", target.host, target.port),
            topics: config.topics.clone(),
            qos: config.qos,
            client_id: config
                .client_id
                .clone()
                .unwrap_or_else(|| format!("nimbus-{function}")),
            concurrency,
            version: config.version,
            target,
        })
    }

    fn session_of(&self, clean: bool) -> Session<'_> {
        Session {
            client_id: &self.client_id,
            clean,
            version: self.version,
            receive_max: self.concurrency.min(u16::MAX as u32) as u16,
        }
    }

    fn message(
        &self,
        topic: String,
        qos: u8,
        dup: bool,
        properties: Properties,
        payload: Vec<u8>,
    ) -> Message {
        let content_type = properties
            .content_type
            .unwrap_or_else(|| "application/octet-stream".into());
        let mut headers = vec![
            ("content-type".into(), content_type),
            ("ce-subject".into(), topic.clone()),
            ("ce-mqtttopic".into(), topic),
            ("ce-mqttqos".into(), qos.to_string()),
            ("ce-mqttredelivered".into(), dup.to_string()),
        ];
        for (name, value) in properties.user {
            let name = name.to_ascii_lowercase();
            if name == "traceparent" || name == "tracestate" {
                headers.push((name, value));
            } else if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                headers.push((format!("mqtt-property-{name}"), value));
            }
        }
        Message {
            function: self.function.clone(),
            id: crate::nats::unique_token(),
            ce_source: self.ce_source.clone(),
            ce_type: "mqtt.message".into(),
            headers,
            body: payload,
            delivery: None,
            per_invocation: None,
        }
    }

    /// One connected session: returns only on a broker error.
    async fn session(
        self: &Arc<Self>,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
        slots: &Arc<Semaphore>,
    ) -> Result<(), SourceError> {
        let (mut read, write) = open(&self.target, self.session_of(false)).await?;
        let write = Arc::new(crate::wire::Writer::new(write));
        let send = move |bytes: Vec<u8>| {
            let write = write.clone();
            async move { write.send(&bytes).await }
        };
        send(subscribe_packet(1, &self.topics, self.qos, self.version)).await?;
        // The broker took the session: what it queued meanwhile arrives now,
        // possibly before the subscription is confirmed.
        status.healthy();
        let pinger = {
            let send = send.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(KEEP_ALIVE / 2);
                loop {
                    every.tick().await;
                    if send(vec![0xC0, 0x00]).await.is_err() {
                        return;
                    }
                }
            })
        };
        let _pinger = crate::wire::AbortOnDrop(pinger);
        let acks = Arc::new(Mutex::new(AckOrder::default()));
        // A message left unacknowledged (its function not serving, or its
        // acknowledgement could not be sent) comes back only with a new
        // session: ending this one asks for it.
        let (abandon, mut abandoned) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            let packet = tokio::select! {
                p = tokio::time::timeout(KEEP_ALIVE * 2, read_packet(&mut read, self.version)) => p.map_err(|_| {
                    SourceError::Disconnected("the broker stopped answering".into())
                })??,
                _ = abandoned.recv() => {
                    return Err(SourceError::Disconnected(
                        "reconnecting so the broker resends a message the function could not take".into(),
                    ));
                }
            };
            match packet {
                Packet::SubAck { codes } => {
                    if let Some(i) = codes.iter().position(|c| *c >= 0x80) {
                        return Err(SourceError::Server(format!(
                            "the broker refused the subscription to {}",
                            self.topics.get(i).map_or("a topic", String::as_str)
                        )));
                    }
                }
                Packet::Publish {
                    dup,
                    qos,
                    topic,
                    id,
                    properties,
                    payload,
                } => {
                    // Waiting here stops the reading: the broker holds what
                    // a busy function cannot take yet.
                    let permit = tokio::select! {
                        p = slots.clone().acquire_owned() => {
                            p.map_err(|_| SourceError::Disconnected("stopping".into()))?
                        }
                        // Messages still buffered on a dead connection are
                        // not run: the broker sends them again.
                        _ = abandoned.recv() => return Err(SourceError::Disconnected(
                            "the connection broke while messages were waiting".into(),
                        )),
                    };
                    if let (Some(id), Ok(mut a)) = (id, acks.lock()) {
                        a.received(id);
                    }
                    let message = self.message(topic, qos, dup, properties, payload);
                    let (deliver, status, acks, abandon) = (
                        deliver.clone(),
                        status.clone(),
                        acks.clone(),
                        abandon.clone(),
                    );
                    let send = send.clone();
                    let function = self.function.clone();
                    tokio::spawn(async move {
                        let verdict = deliver.deliver(message).await;
                        status.counted(&verdict);
                        drop(permit);
                        let Some(id) = id else { return };
                        if !matches!(verdict, Verdict::Succeeded | Verdict::DeadLettered) {
                            let _ = abandon.try_send(());
                            return;
                        }
                        let ready = acks.lock().map(|mut a| a.done(id)).unwrap_or_default();
                        if ready.is_empty() {
                            return;
                        }
                        let pubacks = ready.into_iter().flat_map(puback_packet).collect();
                        if let Err(e) = send(pubacks).await {
                            // Sent again by the broker on reconnection.
                            tracing::warn!(function = %function, error = %e, "could not acknowledge an mqtt message");
                            let _ = abandon.try_send(());
                        }
                    });
                }
                Packet::ConnAck { .. } | Packet::Other => {}
            }
        }
    }
}

impl EventSource for MqttSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            // Its own client id: the running session is not disturbed.
            let id = format!("{}-check", self.client_id);
            let session = Session {
                client_id: &id,
                ..self.session_of(true)
            };
            let (_read, mut write) = open(&self.target, session).await?;
            let _ = write.write_all(&[0xE0, 0x00]).await;
            Ok(())
        })
    }

    fn remove(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            // A clean session under the same id discards what the broker
            // kept for it.
            let (_read, mut write) = open(&self.target, self.session_of(true)).await?;
            let _ = write.write_all(&[0xE0, 0x00]).await;
            Ok(())
        })
    }

    fn run(
        self: Arc<Self>,
        deliver: Arc<dyn Deliver>,
        status: StatusCell,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let slots = Arc::new(Semaphore::new(self.concurrency as usize));
            let this = self.clone();
            crate::wire::reconnecting(
                "mqtt",
                &self.function,
                &self.client_id,
                status.clone(),
                || this.session(&deliver, &status, &slots),
            )
            .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_encode_and_decode() {
        let t = Target::parse("mqtt://u:p@h").unwrap();
        assert_eq!(t.port, 1883);
        let c = connect_packet(&t, "id", false, MqttVersion::V311, 8);
        assert_eq!(c[0], 0x10);
        assert_eq!(c[1] as usize, c.len() - 2);
        assert_eq!(&c[2..8], b"\x00\x04MQTT");
        assert_eq!(c[9], 0xC0, "user and password, no clean session");
        // Lengths past 127 take more bytes.
        assert_eq!(&frame(0x30, &[0; 200])[..3], &[0x30, 0xC8, 0x01]);
        let mut body = vec![0, 3];
        body.extend_from_slice(b"a/b");
        body.extend_from_slice(&[0x01, 0x02]);
        body.extend_from_slice(b"hi");
        assert_eq!(
            decode(0x3A, body, MqttVersion::V311).unwrap(),
            Packet::Publish {
                dup: true,
                qos: 1,
                topic: "a/b".into(),
                id: Some(0x0102),
                properties: Properties::default(),
                payload: b"hi".to_vec()
            }
        );
        assert!(decode(0x32, vec![0, 9, b'a'], MqttVersion::V311).is_err());
        assert_eq!(
            decode(0x90, vec![0, 1, 0x01, 0x80], MqttVersion::V311).unwrap(),
            Packet::SubAck {
                codes: vec![1, 0x80]
            }
        );
    }

    #[test]
    fn mqtt5_packets_carry_properties() {
        let t = Target::parse("mqtt://h").unwrap();
        let c = connect_packet(&t, "id", false, MqttVersion::V5, 16);
        assert_eq!(c[8], 5, "protocol level 5");
        // Flags, keep-alive, then 8 bytes of properties: session expiry
        // (never) and receive maximum.
        assert_eq!(&c[12..21], &[8, 0x11, 0xff, 0xff, 0xff, 0xff, 0x21, 0, 16]);
        let clean = connect_packet(&t, "id", true, MqttVersion::V5, 16);
        assert_eq!(
            &clean[13..18],
            &[0x11, 0, 0, 0, 0],
            "ends with the connection"
        );
        let s = subscribe_packet(1, &["a/#".into()], 1, MqttVersion::V5);
        assert_eq!(&s[2..5], &[0, 1, 0], "id, then no properties");

        let mut body = vec![0, 1, b't', 0, 7];
        let mut props = vec![0x03, 0, 4];
        props.extend_from_slice(b"text");
        props.extend_from_slice(&[0x26, 0, 11]);
        props.extend_from_slice(b"traceparent");
        props.extend_from_slice(&[0, 2]);
        props.extend_from_slice(b"00");
        props.extend_from_slice(&[0x02, 0, 0, 0, 9]); // message expiry, skipped
        body.push(props.len() as u8);
        body.extend_from_slice(&props);
        body.extend_from_slice(b"hi");
        let Packet::Publish {
            properties,
            payload,
            id,
            ..
        } = decode(0x32, body, MqttVersion::V5).unwrap()
        else {
            panic!("not a publish")
        };
        assert_eq!((id, payload), (Some(7), b"hi".to_vec()));
        assert_eq!(properties.content_type.as_deref(), Some("text"));
        assert_eq!(properties.user, [("traceparent".into(), "00".into())]);
        // A property block longer than the packet is refused.
        assert!(decode(0x30, vec![0, 1, b't', 9, 0x01], MqttVersion::V5).is_err());
        assert_eq!(
            decode(0x90, vec![0, 1, 0, 0x01, 0x87], MqttVersion::V5).unwrap(),
            Packet::SubAck {
                codes: vec![1, 0x87]
            }
        );
        let refused = decode(0x20, vec![0, 0x86, 3, 0x1F, 0, 0], MqttVersion::V5).unwrap();
        assert!(matches!(refused, Packet::ConnAck { code: 0x86, .. }));
    }

    #[test]
    fn acknowledgements_keep_arrival_order() {
        let mut a = AckOrder::default();
        for id in [5, 6, 7] {
            a.received(id);
        }
        assert!(a.done(6).is_empty(), "5 is still running");
        assert_eq!(a.done(5), [5, 6]);
        assert_eq!(a.done(7), [7]);
        assert!(a.0.is_empty());
    }
}
