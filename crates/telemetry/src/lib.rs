//! `nimbus-telemetry` owns what the node measures about invocations and
//! itself, and the Prometheus text rendering of it, the store of function
//! output (`logs`), and the writer of the node's own log lines (`console`).
//!
//! Recording is a handful of relaxed atomic increments per invocation, with
//! no locks and no allocation, so it can stay on in production. Metric names
//! follow OpenTelemetry's FaaS semantic conventions where they exist
//! (`faas.invocations`, `faas.errors`, `faas.timeouts`, `faas.coldstarts`,
//! `faas.invoke_duration`), written the Prometheus way (`faas_invocations_total`).

pub mod console;
pub mod logs;
pub mod redact;
pub mod spans;
pub mod trace;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the invocation duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (bytes) of the per-invocation peak memory histogram
/// buckets: 256 KiB to 512 MiB, doubling.
pub const MEMORY_BUCKETS: [f64; 12] = [
    262_144.0,
    524_288.0,
    1_048_576.0,
    2_097_152.0,
    4_194_304.0,
    8_388_608.0,
    16_777_216.0,
    33_554_432.0,
    67_108_864.0,
    134_217_728.0,
    268_435_456.0,
    536_870_912.0,
];

/// Why an invocation failed, as counted in `faas_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The guest trapped (including exhausted memory or stack).
    Trap,
    /// The invocation ran past its timeout.
    Timeout,
    /// The function answered with a 5xx status.
    Status5xx,
    /// Admission refused it (429) or no instance slot was free (503).
    Throttled,
    /// The node could not run it (bad request, no response).
    Other,
}

impl ErrorKind {
    const ALL: [ErrorKind; 5] = [
        ErrorKind::Trap,
        ErrorKind::Timeout,
        ErrorKind::Status5xx,
        ErrorKind::Throttled,
        ErrorKind::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            ErrorKind::Trap => "trap",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status5xx => "5xx",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Other => "other",
        }
    }
}

/// Counters of a function version at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub invocations: u64,
    /// Failures of every kind.
    pub errors: u64,
    pub coldstarts: u64,
    /// Durations per bucket of [`DURATION_BUCKETS`] (not cumulative); the
    /// rest, longer than the last bound, is `duration_count` minus their sum.
    pub duration_buckets: Vec<u64>,
    pub duration_count: u64,
}

/// The `q` quantile (0..1) of the durations counted between `before` and
/// `after`, as the upper bound of its bucket in seconds; `None` without
/// observations. Past the last bucket it is that bucket's bound.
pub fn quantile(before: &Snapshot, after: &Snapshot, q: f64) -> Option<f64> {
    let total = after.duration_count.saturating_sub(before.duration_count);
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        let a = after.duration_buckets.get(i).copied().unwrap_or(0);
        let b = before.duration_buckets.get(i).copied().unwrap_or(0);
        seen += a.saturating_sub(b);
        if seen >= rank {
            return Some(*bound);
        }
    }
    DURATION_BUCKETS.last().copied()
}

/// A fixed-bucket histogram of durations.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A fixed-bucket histogram of the largest memory of each invocation.
#[derive(Default)]
pub struct MemoryHistogram {
    buckets: [AtomicU64; MEMORY_BUCKETS.len()],
    count: AtomicU64,
    sum_bytes: AtomicU64,
}

impl MemoryHistogram {
    /// Records one invocation's peak.
    pub fn observe(&self, bytes: u64) {
        if let Some(i) = MEMORY_BUCKETS.iter().position(|b| bytes as f64 <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Counters of one function version. A node started without metrics
/// builds them [`FunctionMetrics::off`]: nothing is recorded (the
/// benchmark's baseline for what recording costs).
#[derive(Default)]
pub struct FunctionMetrics {
    off: bool,
    invocations: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    coldstarts: AtomicU64,
    duration: Histogram,
    instantiate: Histogram,
    memory: MemoryHistogram,
}

impl FunctionMetrics {
    /// Counters that record nothing.
    pub fn off() -> Self {
        Self {
            off: true,
            ..Self::default()
        }
    }

    /// An invocation was admitted or refused.
    pub fn invoked(&self) {
        if !self.off {
            self.invocations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The invocation was the first of its version.
    pub fn coldstart(&self) {
        if !self.off {
            self.coldstarts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The invocation failed.
    pub fn failed(&self, kind: ErrorKind) {
        if !self.off {
            let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An instance was created in `d`.
    pub fn instantiated(&self, d: Duration) {
        if !self.off {
            self.instantiate.observe(d);
        }
    }

    /// The invocation ended (its response fully sent, or failed) after `d`.
    pub fn finished(&self, d: Duration) {
        if !self.off {
            self.duration.observe(d);
        }
    }

    /// The invocation's instance used at most `bytes` of linear memory.
    pub fn peak_memory(&self, bytes: u64) {
        if !self.off {
            self.memory.observe(bytes);
        }
    }

    /// The counters now, for rates computed by a reader (`nimbus top`).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            invocations: self.invocations(),
            errors: self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum(),
            coldstarts: self.coldstarts.load(Ordering::Relaxed),
            duration_buckets: self
                .duration
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            duration_count: self.duration.count(),
        }
    }

    /// Invocations counted so far.
    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// Failures of one kind so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].load(Ordering::Relaxed)
    }
}

/// One function version's metrics with its labels and live gauges, as the
/// renderer needs them.
pub struct FunctionSample<'a> {
    pub function: &'a str,
    pub version: u64,
    pub metrics: &'a FunctionMetrics,
    pub in_flight: u64,
    pub queued: u64,
    /// Asynchronous invocations waiting in the durable queue.
    pub async_queued: u64,
    /// Asynchronous invocations running.
    pub async_running: u64,
    /// Dead-lettered invocations.
    pub dead_lettered: u64,
    /// Age of the oldest queued asynchronous invocation, in seconds.
    pub oldest_queued_age: f64,
}

/// One labelled series of a histogram: cumulative buckets, sum, count.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    buckets: &[AtomicU64],
    count: u64,
    sum: f64,
) {
    use std::fmt::Write as _;
    let mut cumulative = 0;
    for (bound, bucket) in bounds.iter().zip(buckets) {
        cumulative += bucket.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// Renders Prometheus text exposition format (version 0.0.4).
pub fn render(functions: &[FunctionSample<'_>], process: &ProcessSample) -> String {
    let mut out = String::with_capacity(4096 + functions.len() * 2048);
    let labels = |f: &FunctionSample<'_>| {
        format!(
            "function=\"{}\",version=\"{}\"",
            escape(f.function),
            f.version
        )
    };
    let counter =
        |out: &mut String, name: &str, help: &str, value: &dyn Fn(&FunctionSample<'_>) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for f in functions {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(f), value(f));
            }
        };
    counter(
        &mut out,
        "faas_invocations_total",
        "Invocations received, admitted or not.",
        &|f| f.metrics.invocations(),
    );
    let _ = writeln!(
        out,
        "# HELP faas_errors_total Failed invocations by kind.\n# TYPE faas_errors_total counter"
    );
    for f in functions {
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "faas_errors_total{{{},kind=\"{}\"}} {}",
                labels(f),
                kind.label(),
                f.metrics.errors(kind)
            );
        }
    }
    counter(
        &mut out,
        "faas_timeouts_total",
        "Invocations that ran past their timeout.",
        &|f| f.metrics.errors(ErrorKind::Timeout),
    );
    counter(
        &mut out,
        "faas_coldstarts_total",
        "First invocations of a loaded version.",
        &|f| f.metrics.coldstarts.load(Ordering::Relaxed),
    );
    for (name, help, pick) in [
        (
            "faas_invoke_duration_seconds",
            "Time from admission to the end of the response.",
            (|m: &FunctionMetrics| &m.duration) as fn(&FunctionMetrics) -> &Histogram,
        ),
        (
            "nimbus_instantiate_duration_seconds",
            "Time to create a fresh instance.",
            |m: &FunctionMetrics| &m.instantiate,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for f in functions {
            let h = pick(f.metrics);
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            histogram(
                &mut out,
                name,
                &labels(f),
                &DURATION_BUCKETS,
                &h.buckets,
                h.count(),
                sum,
            );
        }
    }
    let name = "faas_mem_usage_bytes";
    let _ = writeln!(
        out,
        "# HELP {name} Largest linear memory of each invocation's instance.\n# TYPE {name} histogram"
    );
    for f in functions {
        let h = &f.metrics.memory;
        let count = h.count.load(Ordering::Relaxed);
        let sum = h.sum_bytes.load(Ordering::Relaxed) as f64;
        histogram(
            &mut out,
            name,
            &labels(f),
            &MEMORY_BUCKETS,
            &h.buckets,
            count,
            sum,
        );
    }
    for (name, help, value) in [
        (
            "nimbus_in_flight",
            "Invocations running now.",
            (|f: &FunctionSample<'_>| f.in_flight) as fn(&FunctionSample<'_>) -> u64,
        ),
        ("nimbus_queued", "Requests waiting for a slot now.", |f| {
            f.queued
        }),
        (
            "nimbus_async_queued",
            "Asynchronous invocations waiting in the durable queue.",
            |f| f.async_queued,
        ),
        (
            "nimbus_async_running",
            "Asynchronous invocations running or claimed.",
            |f| f.async_running,
        ),
        (
            "nimbus_dlq_size",
            "Invocations in the dead-letter queue.",
            |f| f.dead_lettered,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for f in functions {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(f), value(f));
        }
    }
    let name = "nimbus_async_oldest_age_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Age of the oldest queued asynchronous invocation.\n# TYPE {name} gauge"
    );
    for f in functions {
        let _ = writeln!(out, "{name}{{{}}} {}", labels(f), f.oldest_queued_age);
    }
    process.render(&mut out);
    out
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Process-level figures, read from `/proc/self` where available.
#[derive(Debug, Default, Clone)]
pub struct ProcessSample {
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub start_time_seconds: f64,
}

impl ProcessSample {
    /// Reads the current process's figures.
    pub fn read(start_time_seconds: f64) -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let resident_bytes = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024);
        // utime and stime are fields 14 and 15 of /proc/self/stat, in clock
        // ticks (100 per second on Linux).
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let cpu_seconds = stat.rsplit_once(") ").and_then(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        Self {
            resident_bytes,
            cpu_seconds,
            open_fds,
            start_time_seconds,
        }
    }

    fn render(&self, out: &mut String) {
        let mut gauge = |name: &str, help: &str, kind: &str, value: Option<String>| {
            if let Some(v) = value {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            self.resident_bytes.map(|v| v.to_string()),
        );
        gauge(
            "process_cpu_seconds_total",
            "User and system CPU time spent in seconds.",
            "counter",
            self.cpu_seconds.map(|v| v.to_string()),
        );
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            self.open_fds.map(|v| v.to_string()),
        );
        gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            "gauge",
            Some(self.start_time_seconds.to_string()),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_come_from_bucket_deltas() {
        let m = FunctionMetrics::default();
        let before = m.snapshot();
        for _ in 0..98 {
            m.finished(Duration::from_micros(300));
        }
        m.finished(Duration::from_millis(20));
        m.finished(Duration::from_millis(20));
        let after = m.snapshot();
        assert_eq!(quantile(&before, &after, 0.5), Some(0.0005));
        assert_eq!(quantile(&before, &after, 0.99), Some(0.025));
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = FunctionMetrics::default();
        m.invoked();
        m.invoked();
        m.coldstart();
        m.failed(ErrorKind::Timeout);
        m.finished(Duration::from_millis(3));
        m.finished(Duration::from_secs(100));
        m.peak_memory(1_500_000);
        let text = render(
            &[FunctionSample {
                function: "hello",
                version: 2,
                metrics: &m,
                in_flight: 1,
                queued: 0,
                async_queued: 0,
                async_running: 0,
                dead_lettered: 0,
                oldest_queued_age: 0.0,
            }],
            &ProcessSample::read(0.0),
        );
        let l = "function=\"hello\",version=\"2\"";
        for line in [
            format!("faas_invocations_total{{{l}}} 2"),
            format!("faas_errors_total{{{l},kind=\"timeout\"}} 1"),
            format!("faas_timeouts_total{{{l}}} 1"),
            format!("faas_coldstarts_total{{{l}}} 1"),
            format!("faas_invoke_duration_seconds_bucket{{{l},le=\"0.0025\"}} 0"),
            format!("faas_invoke_duration_seconds_bucket{{{l},le=\"0.005\"}} 1"),
            format!("faas_invoke_duration_seconds_bucket{{{l},le=\"30\"}} 1"),
            format!("faas_invoke_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2"),
            format!("faas_invoke_duration_seconds_count{{{l}}} 2"),
            format!("nimbus_in_flight{{{l}}} 1"),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(text.contains("# TYPE faas_invoke_duration_seconds histogram"));
        assert!(text.contains("# TYPE faas_mem_usage_bytes histogram"));
        assert!(text.contains("le=\"1048576\"} 0"), "{text}");
        assert!(text.contains("le=\"2097152\"} 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "));
    }
}
