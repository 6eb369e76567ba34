//! Commands for asynchronous work: submitting, inspecting invocations, the
//! dead-letter queue and schedules.

use crate::client::{Admin, decode};
use crate::output::{Format, table};
use bytes::Bytes;
use http::Method;
use nimbus_api::{AsyncAccepted, RedriveRequest, ScheduleInfo};
use nimbus_queue::InvocationRecord;

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A Unix ms timestamp as UTC date and time, for listings.
pub fn when(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Queues an invocation of `name` and prints its id.
pub async fn submit(
    admin: &Admin,
    name: &str,
    path: &str,
    headers: &[(String, String)],
    body: Bytes,
    format: Format,
) -> anyhow::Result<()> {
    let mut all: Vec<(&str, &str)> = vec![("nimbus-invocation-type", "async")];
    all.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let reply = admin
        .raw_with(
            Method::POST,
            &format!(
                "/v1/functions/{name}/invocations?path={}",
                crate::client::percent_encode(path, b"/")
            ),
            &all,
            body,
        )
        .await?;
    let accepted: AsyncAccepted = decode(reply)?;
    if format == Format::Json {
        return print_json(&accepted);
    }
    let note = if accepted.duplicate {
        " (an earlier submission with this Idempotency-Key)"
    } else {
        ""
    };
    println!("queued {}{note}", accepted.invocation_id);
    eprintln!(
        "follow it with `nimbus invocation {}`",
        accepted.invocation_id
    );
    Ok(())
}

/// Lists a function's invocations (or its dead-letter queue).
pub async fn list(
    admin: &Admin,
    name: &str,
    state: Option<&str>,
    limit: usize,
    dlq: bool,
    format: Format,
) -> anyhow::Result<()> {
    let path = if dlq {
        format!("/v1/functions/{name}/dlq?limit={limit}")
    } else {
        format!(
            "/v1/functions/{name}/invocations?limit={limit}&state={}",
            state.unwrap_or("")
        )
    };
    let list: Vec<InvocationRecord> = admin.call(Method::GET, &path, None::<&()>).await?;
    if format == Format::Json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let last = r.attempts.last();
            vec![
                r.id.clone(),
                r.state.as_str().to_owned(),
                r.trigger.as_str().to_owned(),
                r.attempts.len().to_string(),
                last.and_then(|a| a.status)
                    .map_or_else(|| "-".into(), |s| s.to_string()),
                when(r.created_at),
                r.error
                    .clone()
                    .or_else(|| r.target.clone().map(|t| format!("to {t}")))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "INVOCATION",
                "STATE",
                "TRIGGER",
                "ATTEMPTS",
                "LAST STATUS",
                "ACCEPTED",
                "DETAIL"
            ],
            &rows
        )
    );
    if rows.is_empty() {
        println!(
            "{}",
            if dlq {
                "the dead-letter queue is empty"
            } else {
                "no invocations"
            }
        );
    }
    Ok(())
}

/// Shows one invocation with its attempts.
pub async fn show(admin: &Admin, id: &str, format: Format) -> anyhow::Result<()> {
    let r: InvocationRecord = admin
        .call(Method::GET, &format!("/v1/invocations/{id}"), None::<&()>)
        .await?;
    if format == Format::Json {
        return print_json(&r);
    }
    println!("invocation  {}", r.id);
    println!("function    {}", r.function);
    if let Some(t) = &r.target {
        println!("delivers to {t}");
    }
    println!("state       {}", r.state.as_str());
    println!(
        "trigger     {} ({} from {})",
        r.trigger.as_str(),
        r.ce_type,
        r.ce_source
    );
    println!(
        "request     {} {} ({} bytes)",
        r.method, r.path, r.body_bytes
    );
    println!("accepted    {}", when(r.created_at));
    if let Some(next) = r.next_attempt_at {
        println!("next        {}", when(next));
    }
    if let Some(e) = &r.error {
        println!("error       {e}");
    }
    if let Some(res) = &r.result {
        let more = if res.truncated { " (truncated)" } else { "" };
        println!("result      {}{more}", res.status);
        if !res.body.is_empty() {
            println!("{}", res.body.trim_end());
        }
    }
    let rows: Vec<Vec<String>> = r
        .attempts
        .iter()
        .map(|a| {
            vec![
                a.n.to_string(),
                when(a.started_at),
                format!("{:.1} ms", a.duration_ms),
                a.status.map_or_else(|| "-".into(), |s| s.to_string()),
                a.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        println!();
        print!(
            "{}",
            table(
                &["ATTEMPT", "STARTED", "DURATION", "STATUS", "ERROR"],
                &rows
            )
        );
    }
    Ok(())
}

/// Queues dead-lettered invocations again.
pub async fn redrive(
    admin: &Admin,
    name: &str,
    ids: &[String],
    all: bool,
    format: Format,
) -> anyhow::Result<()> {
    if ids.is_empty() != all {
        anyhow::bail!("name the invocations with --id ID (repeatable), or pass --all");
    }
    let v: serde_json::Value = admin
        .call(
            Method::POST,
            &format!("/v1/functions/{name}/dlq/redrive"),
            Some(&RedriveRequest {
                ids: ids.to_vec(),
                all,
            }),
        )
        .await?;
    if format == Format::Json {
        return print_json(&v);
    }
    println!("redrove {} invocation(s) of {name}", v["redriven"]);
    Ok(())
}

/// Deletes a function's dead-lettered invocations.
pub async fn purge(admin: &Admin, name: &str, format: Format) -> anyhow::Result<()> {
    let v: serde_json::Value = admin
        .call(
            Method::DELETE,
            &format!("/v1/functions/{name}/dlq"),
            None::<&()>,
        )
        .await?;
    if format == Format::Json {
        return print_json(&v);
    }
    println!("purged {} invocation(s) of {name}", v["purged"]);
    Ok(())
}

/// Lists schedules with their next fire times.
pub async fn schedules(admin: &Admin, format: Format) -> anyhow::Result<()> {
    let list: Vec<ScheduleInfo> = admin
        .call(Method::GET, "/v1/schedules", None::<&()>)
        .await?;
    if format == Format::Json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.function.clone(),
                s.cron.clone(),
                s.timezone.clone(),
                s.catch_up.clone(),
                s.last_tick.clone().unwrap_or_else(|| "-".into()),
                s.next.join("  "),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "FUNCTION",
                "CRON",
                "TIMEZONE",
                "CATCH-UP",
                "LAST TICK",
                "NEXT"
            ],
            &rows
        )
    );
    if rows.is_empty() {
        println!("no schedules");
    }
    Ok(())
}
