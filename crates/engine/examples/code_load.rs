//! How long a code load takes: mapping a component's compiled artifact
//! and linking it, what a request after scale to zero pays before its
//! instance is made. Each load follows a pause (none, 20 ms, 200 ms), so
//! the figures show the same work with the CPU's caches warm and after it
//! idled (`PAUSES_MS=0,20,200` sets the pauses). docs/performance.md
//! quotes it.
//!
//! ```text
//! cargo run --release -p nimbus-engine --example code_load -- COMPONENT.wasm [TRIALS]
//! ```

use anyhow::{Context, Result};
use nimbus_engine::{Engine, FunctionLimits, FunctionSpec, Load, OutboundPolicy};
use std::time::{Duration, Instant};

// The node's allocator: a load allocates its type tables from it.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let component = args
        .next()
        .context("usage: code_load COMPONENT.wasm [TRIALS]")?;
    let trials: usize = match args.next() {
        Some(n) => n.parse().context("TRIALS must be a number")?,
        None => 100,
    };
    anyhow::ensure!(trials > 0, "TRIALS must be at least 1");
    let bytes = std::fs::read(&component).with_context(|| format!("reading {component}"))?;
    let dir = tempfile::tempdir()?;
    let engine = Engine::new(dir.path())?;
    let digest = engine.compile(&bytes)?;
    // The optimising compile runs in the background: loads map its code.
    let deadline = Instant::now() + Duration::from_secs(600);
    while engine.stats().optimized < 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the optimising compile did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let spec = FunctionSpec {
        name: "load".into(),
        version: 1,
        digest,
        env: Vec::new(),
        limits: FunctionLimits {
            memory_bytes: 128 << 20,
            timeout: Duration::from_secs(30),
        },
        outbound: OutboundPolicy::default(),
        secrets: nimbus_telemetry::redact::Redactor::new(Vec::new()),
        reuse: 1,
        max_idle_instances: 1,
        prewarm: 0,
    };
    println!(
        "component {component} ({} bytes), {trials} trials",
        bytes.len()
    );
    let pauses: Vec<u64> = match std::env::var("PAUSES_MS") {
        Ok(list) => list
            .split(',')
            .map(|p| {
                p.trim()
                    .parse()
                    .context("PAUSES_MS is a comma-separated list of milliseconds")
            })
            .collect::<Result<_>>()?,
        Err(_) => vec![0, 20, 200],
    };
    for pause in pauses {
        let mut loads = Vec::with_capacity(trials);
        for _ in 0..trials {
            // Nothing holds the code: the next prepare maps and links it.
            engine.retain_components(&[]);
            std::thread::sleep(Duration::from_millis(pause));
            let started = Instant::now();
            let runtime = engine.prepare(spec.clone(), Load::Now)?;
            loads.push(started.elapsed());
            drop(runtime);
        }
        loads.sort();
        let at = |p: usize| loads[(loads.len() * p / 100).min(loads.len() - 1)].as_secs_f64() * 1e6;
        println!(
            "after a {pause:>3} ms pause: code load p50 {:.0} µs, p90 {:.0} µs",
            at(50),
            at(90)
        );
    }
    Ok(())
}
