//! `nimbus logs`: a function's stored output, and live lines with `-f`.

use crate::client::Admin;
use crate::output::Format;
use http::Method;
use nimbus_telemetry::logs::LogLine;

/// Filters of `nimbus logs`.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub since: Option<String>,
    pub invocation: Option<String>,
    pub grep: Option<String>,
    pub limit: usize,
}

impl Query {
    fn to_query(&self) -> String {
        let mut q = format!("limit={}", self.limit);
        for (k, v) in [
            ("since", &self.since),
            ("invocation", &self.invocation),
            ("grep", &self.grep),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", crate::client::percent_encode(v, b"")));
            }
        }
        q
    }
}

fn print_line(line: &LogLine, format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string(line).unwrap_or_default());
        return;
    }
    let at = jiff::Timestamp::from_millisecond(line.at)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    let stream = if line.stream == "stderr" {
        " [stderr]"
    } else {
        ""
    };
    println!(
        "{at} {} v{}{stream} {}",
        line.invocation, line.version, line.text
    );
}

/// Prints the stored lines, then (with `follow`) live ones until the node
/// stops or the user interrupts.
pub async fn show(
    admin: &Admin,
    name: &str,
    query: &Query,
    follow: bool,
    format: Format,
) -> anyhow::Result<()> {
    let path = format!("/v1/functions/{name}/logs?{}", query.to_query());
    if !follow {
        let lines: Vec<LogLine> = admin.call(Method::GET, &path, None::<&()>).await?;
        if format == Format::Json {
            // A listing is one JSON array; `-f` prints JSON lines.
            println!("{}", serde_json::to_string_pretty(&lines)?);
            return Ok(());
        }
        for l in &lines {
            print_line(l, format);
        }
        return Ok(());
    }
    admin
        .stream(&format!("{path}&follow=true"), |event| {
            if let Some(json) = event.strip_prefix("data: ")
                && let Ok(line) = serde_json::from_str::<LogLine>(json)
            {
                print_line(&line, format);
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
            }
        })
        .await
}
