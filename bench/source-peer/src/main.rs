//! The event-source benchmark's peer: publishes stamped messages to a
//! broker, and drains a broker as a plain consumer (read, acknowledge
//! each, nothing else) with the client code Nimbus's sources use, so the
//! two rates compare the consumer machinery, not the clients.
//!
//!   source-peer publish redis|jetstream|amqp|mqtt|postgres URL TARGET COUNT RATE
//!   source-peer drain redis URL STREAM GROUP COUNT BATCH
//!   source-peer drain jetstream URL STREAM CONSUMER COUNT BATCH
//!   source-peer drain amqp URL QUEUE COUNT PREFETCH
//!   source-peer drain postgres URL TABLE COUNT
//!   source-peer setup jetstream URL STREAM SUBJECTS
//!   source-peer setup amqp URL QUEUE
//!   source-peer setup postgres URL TABLE
//!   source-peer record
//!
//! For PostgreSQL, TABLE also names the publication and the slot that
//! `setup` creates (Nimbus, given `slot = TABLE`, reuses them); each row is
//! inserted in a transaction of its own, and `drain` streams the slot and
//! confirms each transaction, then drops the slot and the publication.
//!
//! `record` serves the reports of the latency benchmark's function until
//! it is killed (see [`record`]).
//!
//! A message's body is `{"t":<publish time, ns since the epoch>,"i":<n>}`.
//! RATE 0 publishes as fast as the broker takes them. Results are printed
//! as one JSON line.

use nimbus_sources::{amqp, mqtt, nats, pg, resp};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Error = Box<dyn std::error::Error>;

fn stamp(i: usize) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{{\"t\":{t},\"i\":{i}}}")
}

/// Sleeps until message `i` is due at `rate` per second.
async fn pace(start: Instant, i: usize, rate: f64) {
    if rate > 0.0 {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
    }
}

async fn publish(
    kind: &str,
    url: &str,
    target: &str,
    count: usize,
    rate: f64,
) -> Result<(), Error> {
    let start = Instant::now();
    match kind {
        "redis" => {
            let mut c = resp::Conn::connect(&resp::Target::parse(url)?).await?;
            for i in 0..count {
                pace(start, i, rate).await;
                let body = stamp(i);
                c.cmd(&[b"XADD", target.as_bytes(), b"*", b"body", body.as_bytes()])
                    .await?;
            }
        }
        "jetstream" => {
            let c = nats::Client::connect(&nats::Target::parse(url)?, "source-peer").await?;
            // Each one stored before the next (the publish acknowledgement).
            for i in 0..count {
                pace(start, i, rate).await;
                c.request(target, stamp(i).as_bytes(), Duration::from_secs(30))
                    .await?;
            }
        }
        "amqp" => {
            let c = amqp::Client::connect(&amqp::Target::parse(url)?, "source-peer").await?;
            for i in 0..count {
                pace(start, i, rate).await;
                c.publish(target, &[], stamp(i).as_bytes()).await?;
            }
            c.queue_exists(target).await?;
        }
        "mqtt" => {
            let mut c = mqtt::Publisher::connect(url, "source-peer").await?;
            for i in 0..count {
                pace(start, i, rate).await;
                c.publish(target, stamp(i).as_bytes()).await?;
            }
        }
        "postgres" => {
            let mut c = pg::Conn::connect(&pg::Target::parse(url)?).await?;
            for i in 0..count {
                pace(start, i, rate).await;
                c.execute(&format!(
                    "INSERT INTO {} (body) VALUES ({})",
                    pg::ident(target),
                    pg::literal(&stamp(i))
                ))
                .await?;
            }
        }
        other => return Err(format!("unknown broker {other}").into()),
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"published\":{count},\"seconds\":{secs},\"rate\":{}}}",
        count as f64 / secs
    );
    Ok(())
}

async fn drain_redis(
    url: &str,
    stream: &str,
    group: &str,
    count: usize,
    batch: usize,
) -> Result<f64, Error> {
    let target = resp::Target::parse(url)?;
    let mut reader = resp::Conn::connect(&target).await?;
    let mut acker = resp::Conn::connect(&target).await?;
    let n = batch.to_string();
    let mut done = 0;
    let start = Instant::now();
    while done < count {
        let reply = reader
            .cmd(&[
                b"XREADGROUP",
                b"GROUP",
                group.as_bytes(),
                b"peer",
                b"COUNT",
                n.as_bytes(),
                b"BLOCK",
                b"2000",
                b"STREAMS",
                stream.as_bytes(),
                b">",
            ])
            .await?;
        let entries = reply
            .into_array()
            .into_iter()
            .next()
            .map(|s| {
                s.into_array()
                    .into_iter()
                    .nth(1)
                    .map(resp::Value::into_array)
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        // Each read's entries are acknowledged with one XACK, as Nimbus
        // acknowledges whatever finished while its previous XACK was out.
        let ids: Vec<String> = entries
            .into_iter()
            .filter_map(|e| e.into_array().into_iter().next().and_then(|v| v.as_text()))
            .collect();
        if !ids.is_empty() {
            let mut args: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), group.as_bytes()];
            args.extend(ids.iter().map(|id| id.as_bytes()));
            acker.cmd(&args).await?;
            done += ids.len();
        }
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

async fn drain_jetstream(
    url: &str,
    stream: &str,
    consumer: &str,
    count: usize,
    batch: usize,
) -> Result<f64, Error> {
    let c = nats::Client::connect(&nats::Target::parse(url)?, "source-peer").await?;
    let config = serde_json::json!({
        "stream_name": stream,
        "config": {"durable_name": consumer, "ack_policy": "explicit", "deliver_policy": "all"},
    });
    c.request(
        &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}"),
        config.to_string().as_bytes(),
        Duration::from_secs(5),
    )
    .await?;
    let inbox = c.inbox("pull");
    let mut messages = c.subscribe(&inbox, None).await?;
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}");
    let mut done = 0;
    let start = Instant::now();
    while done < count {
        let want = batch.min(count - done);
        let request = serde_json::json!({"batch": want, "expires": 2_000_000_000u64});
        c.publish(&next, Some(&inbox), request.to_string().as_bytes())
            .await?;
        let mut got = 0;
        while got < want {
            let Some(m) = messages.recv().await else {
                return Err("the connection closed".into());
            };
            if m.status.is_some() {
                break;
            }
            if let Some(reply) = &m.reply {
                c.publish(reply, None, b"+ACK").await?;
            }
            got += 1;
        }
        done += got;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

async fn drain_amqp(url: &str, queue: &str, count: usize, prefetch: u16) -> Result<f64, Error> {
    let c = amqp::Client::connect(&amqp::Target::parse(url)?, "source-peer").await?;
    let mut deliveries = c.consume(queue, prefetch, "source-peer").await?;
    let start = Instant::now();
    for _ in 0..count {
        let d = deliveries.recv().await.ok_or("the connection closed")?;
        c.ack(d.tag).await?;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

async fn drain_postgres(url: &str, table: &str, count: usize) -> Result<f64, Error> {
    let target = pg::Target::parse(url)?;
    let conn = pg::Conn::connect_replication(&target).await?;
    let (mut stream, feedback) = conn.start_replication(table, table).await?;
    let mut done = 0;
    let start = Instant::now();
    while done < count {
        match stream.next().await? {
            pg::Replicated::Data { data, .. } => match data.first() {
                Some(b'I') => done += 1,
                // Commit: flags, commit LSN, end LSN.
                Some(b'C') => {
                    let end = data
                        .get(10..18)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .ok_or("a short commit message")?;
                    feedback.confirm(end).await?;
                }
                _ => {}
            },
            pg::Replicated::Keepalive { reply: true, .. } => feedback.confirm(0).await?,
            pg::Replicated::Keepalive { .. } => {}
        }
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    drop(stream);
    drop(feedback);
    let mut c = pg::Conn::connect(&target).await?;
    for _ in 0..50 {
        let dropped = c
            .query(&format!(
                "SELECT pg_drop_replication_slot({})",
                pg::literal(table)
            ))
            .await?;
        if dropped.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.execute(&format!("DROP PUBLICATION IF EXISTS {}", pg::ident(table)))
        .await?;
    Ok(rate)
}

/// The HTTP server a latency function reports to: prints `port <n>`, then
/// one line per request, `<unix ns at its arrival> <request target>`, and
/// answers 200 with no body (keep-alive). Written in Rust with the rest of
/// the peer so that the recorder costs the function little time of its own:
/// a function delivered in order waits for its report's answer.
async fn record() -> Result<(), Error> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("port {}", listener.local_addr()?.port());
    let (lines, out) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        while let Ok(line) = out.recv() {
            if stdout.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
    });
    loop {
        let (socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        let lines = lines.clone();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut read = BufReader::new(read);
            let mut line = String::new();
            loop {
                line.clear();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let target = line.split(' ').nth(1).unwrap_or("").to_owned();
                // The head ends with an empty line; the reports carry no body.
                let mut header = String::new();
                loop {
                    header.clear();
                    if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if header.trim_end().is_empty() {
                        break;
                    }
                }
                let _ = lines.send(format!("{at} {target}\n"));
                if write
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let num = |s: &str| s.parse::<usize>().map_err(|e| format!("`{s}`: {e}"));
    match a.as_slice() {
        ["publish", kind, url, target, count, rate] => {
            publish(kind, url, target, num(count)?, rate.parse()?).await
        }
        ["drain", "redis", url, stream, group, count, batch] => {
            let rate = drain_redis(url, stream, group, num(count)?, num(batch)?).await?;
            println!("{{\"rate\":{rate}}}");
            Ok(())
        }
        ["drain", "jetstream", url, stream, consumer, count, batch] => {
            let rate = drain_jetstream(url, stream, consumer, num(count)?, num(batch)?).await?;
            println!("{{\"rate\":{rate}}}");
            Ok(())
        }
        ["drain", "amqp", url, queue, count, prefetch] => {
            let rate = drain_amqp(url, queue, num(count)?, num(prefetch)? as u16).await?;
            println!("{{\"rate\":{rate}}}");
            Ok(())
        }
        ["setup", "jetstream", url, stream, subjects] => {
            let c = nats::Client::connect(&nats::Target::parse(url)?, "source-peer").await?;
            let config =
                serde_json::json!({"name": stream, "subjects": [subjects], "storage": "file"});
            let reply = c
                .request(
                    &format!("$JS.API.STREAM.CREATE.{stream}"),
                    config.to_string().as_bytes(),
                    Duration::from_secs(5),
                )
                .await?;
            println!("{}", String::from_utf8_lossy(&reply.payload));
            Ok(())
        }
        ["drain", "postgres", url, table, count] => {
            let rate = drain_postgres(url, table, num(count)?).await?;
            println!("{{\"rate\":{rate}}}");
            Ok(())
        }
        ["setup", "postgres", url, table] => {
            let mut c = pg::Conn::connect(&pg::Target::parse(url)?).await?;
            let t = pg::ident(table);
            c.execute(&format!(
                "CREATE TABLE {t} (id bigserial PRIMARY KEY, body text)"
            ))
            .await?;
            c.execute(&format!("CREATE PUBLICATION {t} FOR TABLE {t}"))
                .await?;
            c.execute(&format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                pg::literal(table)
            ))
            .await?;
            Ok(())
        }
        ["setup", "amqp", url, queue] => {
            let c = amqp::Client::connect(&amqp::Target::parse(url)?, "source-peer").await?;
            c.declare_queue(queue).await?;
            Ok(())
        }
        ["record"] => record().await,
        _ => Err("usage: see the top of bench/source-peer/src/main.rs".into()),
    }
}
