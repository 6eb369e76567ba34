//! `nimbus top`: a live view of every function's traffic, like `top`.

use crate::client::Admin;
use crate::output::{Format, table};
use http::Method;
use nimbus_api::FunctionStats;
use nimbus_telemetry::quantile;
use std::collections::HashMap;
use std::time::Duration;

/// One function's figures over the last interval.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub function: String,
    pub version: u64,
    pub requests_per_s: f64,
    pub errors_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub in_flight: u64,
    pub queued: u64,
    pub async_queued: u64,
    pub coldstarts: u64,
}

/// Rates between two samples, busiest first.
pub fn rows(before: &[FunctionStats], after: &[FunctionStats]) -> Vec<Row> {
    let earlier: HashMap<(&str, u64), &FunctionStats> = before
        .iter()
        .map(|s| ((s.function.as_str(), s.version), s))
        .collect();
    let mut out: Vec<Row> = after
        .iter()
        .map(|a| {
            let b = earlier.get(&(a.function.as_str(), a.version));
            let zero = nimbus_telemetry::Snapshot::default();
            let bc = b.map_or(&zero, |b| &b.counters);
            let secs = b.map_or(1.0, |b| ((a.at - b.at).max(1) as f64) / 1000.0);
            let delta = |x: u64, y: u64| x.saturating_sub(y) as f64 / secs;
            Row {
                function: a.function.clone(),
                version: a.version,
                requests_per_s: delta(a.counters.invocations, bc.invocations),
                errors_per_s: delta(a.counters.errors, bc.errors),
                p50_ms: quantile(bc, &a.counters, 0.5).map(|s| s * 1000.0),
                p99_ms: quantile(bc, &a.counters, 0.99).map(|s| s * 1000.0),
                in_flight: a.in_flight,
                queued: a.queued,
                async_queued: a.async_queued,
                coldstarts: a.counters.coldstarts.saturating_sub(bc.coldstarts),
            }
        })
        .collect();
    out.sort_by(|x, y| {
        y.requests_per_s
            .total_cmp(&x.requests_per_s)
            .then_with(|| x.function.cmp(&y.function))
    });
    out
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("≤{v}"))
}

fn render(rows: &[Row], interval: Duration) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.function.clone(),
                format!("v{}", r.version),
                format!("{:.1}", r.requests_per_s),
                format!("{:.1}", r.errors_per_s),
                ms(r.p50_ms),
                ms(r.p99_ms),
                r.in_flight.to_string(),
                r.queued.to_string(),
                r.async_queued.to_string(),
                r.coldstarts.to_string(),
            ]
        })
        .collect();
    format!(
        "nimbus top: every {:.1}s (latency: upper bound of its histogram bucket)\n\n{}",
        interval.as_secs_f64(),
        table(
            &[
                "FUNCTION",
                "VERSION",
                "REQ/S",
                "ERR/S",
                "P50 MS",
                "P99 MS",
                "IN-FLIGHT",
                "QUEUED",
                "ASYNC",
                "COLD",
            ],
            &body
        )
    )
}

/// Samples every `interval` and redraws; with `once`, prints one frame.
pub async fn run(
    admin: &Admin,
    interval: Duration,
    once: bool,
    format: Format,
) -> anyhow::Result<()> {
    let sample = || async {
        admin
            .call::<Vec<FunctionStats>>(Method::GET, "/v1/stats", None::<&()>)
            .await
    };
    let mut before = sample().await?;
    loop {
        tokio::time::sleep(interval).await;
        let after = sample().await?;
        let rows = rows(&before, &after);
        if format == Format::Json {
            println!("{}", serde_json::to_string(&rows)?);
        } else if once {
            print!("{}", render(&rows, interval));
        } else {
            // Clear the screen and draw from the top.
            print!("\x1b[2J\x1b[H{}", render(&rows, interval));
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
        if once {
            return Ok(());
        }
        before = after;
    }
}
