//! MQTT 3.1.1 topics through a persistent session.
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

use crate::wire::{Url, bad_url};
use crate::{BoxFuture, Deliver, EventSource, Message, SourceError, StatusCell, Verdict};
use nimbus_manifest::Mqtt;
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
    },
    Publish {
        dup: bool,
        qos: u8,
        topic: String,
        id: Option<u16>,
        payload: Vec<u8>,
    },
    SubAck {
        codes: Vec<u8>,
    },
    /// PUBACK, PINGRESP and others this consumer needs not act on.
    Other,
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

fn connect_packet(target: &Target, client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    let mut flags = if clean { 0x02 } else { 0 };
    if target.user.is_some() {
        flags |= 0x80;
    }
    if target.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&(KEEP_ALIVE.as_secs() as u16).to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    if let Some(u) = &target.user {
        put_str(&mut body, u.as_bytes());
    }
    if let Some(p) = &target.password {
        put_str(&mut body, p.as_bytes());
    }
    frame(0x10, &body)
}

fn subscribe_packet(id: u16, filters: &[String], qos: u8) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
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
fn decode(first: u8, body: Vec<u8>) -> Result<Packet, SourceError> {
    let short = || SourceError::Protocol("a packet from the broker is cut short".into());
    let u16_at = |b: &[u8], at: usize| -> Result<u16, SourceError> {
        Ok(u16::from_be_bytes([
            *b.get(at).ok_or_else(short)?,
            *b.get(at + 1).ok_or_else(short)?,
        ]))
    };
    Ok(match first >> 4 {
        2 => Packet::ConnAck {
            code: *body.get(1).ok_or_else(short)?,
        },
        3 => {
            let qos = (first >> 1) & 0x03;
            let len = u16_at(&body, 0)? as usize;
            let topic = body.get(2..2 + len).ok_or_else(short)?;
            let topic = String::from_utf8_lossy(topic).into_owned();
            let mut at = 2 + len;
            let id = if qos > 0 {
                at += 2;
                Some(u16_at(&body, at - 2)?)
            } else {
                None
            };
            Packet::Publish {
                dup: first & 0x08 != 0,
                qos,
                topic,
                id,
                payload: body.get(at..).ok_or_else(short)?.to_vec(),
            }
        }
        9 => Packet::SubAck {
            codes: body.get(2..).ok_or_else(short)?.to_vec(),
        },
        _ => Packet::Other,
    })
}

async fn read_packet(read: &mut OwnedReadHalf) -> Result<Packet, SourceError> {
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
    decode(first, body)
}

/// Connects and completes the CONNECT / CONNACK exchange.
async fn open(
    target: &Target,
    client_id: &str,
    clean: bool,
) -> Result<(OwnedReadHalf, OwnedWriteHalf), SourceError> {
    let addr = format!("{}:{}", target.host, target.port);
    let handshake = async {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| SourceError::Unreachable(format!("{addr} ({e})")))?;
        let _ = stream.set_nodelay(true);
        let (mut read, mut write) = stream.into_split();
        write
            .write_all(&connect_packet(target, client_id, clean))
            .await
            .map_err(|e| SourceError::Disconnected(e.to_string()))?;
        match read_packet(&mut read).await? {
            Packet::ConnAck { code: 0 } => Ok((read, write)),
            Packet::ConnAck { code: 4 | 5 } => Err(SourceError::Auth(format!(
                "{addr} refused the user name or password"
            ))),
            Packet::ConnAck { code } => Err(SourceError::Server(format!(
                "{addr} refused the connection (code {code})"
            ))),
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
        let (read, write) = open(&Target::parse(url)?, client_id, true).await?;
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
        read_packet(&mut self.read).await.map(|_| ())
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
            target,
        })
    }

    fn message(&self, topic: String, qos: u8, dup: bool, payload: Vec<u8>) -> Message {
        Message {
            function: self.function.clone(),
            id: crate::nats::unique_token(),
            ce_source: self.ce_source.clone(),
            ce_type: "mqtt.message".into(),
            headers: vec![
                ("content-type".into(), "application/octet-stream".into()),
                ("ce-subject".into(), topic.clone()),
                ("ce-mqtttopic".into(), topic),
                ("ce-mqttqos".into(), qos.to_string()),
                ("ce-mqttredelivered".into(), dup.to_string()),
            ],
            body: payload,
            delivery: None,
        }
    }

    /// One connected session: returns only on a broker error.
    async fn session(
        self: &Arc<Self>,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
        slots: &Arc<Semaphore>,
    ) -> Result<(), SourceError> {
        let (mut read, write) = open(&self.target, &self.client_id, false).await?;
        let write = Arc::new(tokio::sync::Mutex::new(write));
        let send = move |bytes: Vec<u8>| {
            let write = write.clone();
            async move {
                write
                    .lock()
                    .await
                    .write_all(&bytes)
                    .await
                    .map_err(|e| SourceError::Disconnected(e.to_string()))
            }
        };
        send(subscribe_packet(1, &self.topics, self.qos)).await?;
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
        let _pinger = AbortOnDrop(pinger);
        let acks = Arc::new(Mutex::new(AckOrder::default()));
        // A message left unacknowledged (its function not serving, or its
        // acknowledgement could not be sent) comes back only with a new
        // session: ending this one asks for it.
        let (abandon, mut abandoned) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            let packet = tokio::select! {
                p = tokio::time::timeout(KEEP_ALIVE * 2, read_packet(&mut read)) => p.map_err(|_| {
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
                    if let Some(i) = codes.iter().position(|c| *c == 0x80) {
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
                    let message = self.message(topic, qos, dup, payload);
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
                        for id in ready {
                            if let Err(e) = send(puback_packet(id)).await {
                                // Sent again by the broker on reconnection.
                                tracing::warn!(function = %function, error = %e, "could not acknowledge an mqtt message");
                                let _ = abandon.try_send(());
                                return;
                            }
                        }
                    });
                }
                Packet::ConnAck { .. } | Packet::Other => {}
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl EventSource for MqttSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            // Its own client id: the running session is not disturbed.
            let id = format!("{}-check", self.client_id);
            let (_read, mut write) = open(&self.target, &id, true).await?;
            let _ = write.write_all(&[0xE0, 0x00]).await;
            Ok(())
        })
    }

    fn remove(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            // A clean session under the same id discards what the broker
            // kept for it.
            let (_read, mut write) = open(&self.target, &self.client_id, true).await?;
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
        let c = connect_packet(&t, "id", false);
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
            decode(0x3A, body).unwrap(),
            Packet::Publish {
                dup: true,
                qos: 1,
                topic: "a/b".into(),
                id: Some(0x0102),
                payload: b"hi".to_vec()
            }
        );
        assert!(decode(0x32, vec![0, 9, b'a']).is_err());
        assert_eq!(
            decode(0x90, vec![0, 1, 0x01, 0x80]).unwrap(),
            Packet::SubAck {
                codes: vec![1, 0x80]
            }
        );
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
