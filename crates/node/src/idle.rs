//! Scale to zero: a function nobody calls gives its memory back. Once a
//! second (more often for short idle times), every serving version drops
//! the idle instances that have waited too long and, after
//! `--scale-to-zero-after` without a request, its code too; the compiled
//! artifact stays on disk, so the next request maps it again in well under
//! a millisecond (a cold start). A version whose idle times are
//! predictable follows them instead (`nimbus_engine::keepalive`): unloaded
//! soon after each call when the next one is far off, loaded again ahead
//! of it. Versions that keep instances warm (`prewarm`) are exempt, and the
//! same sweep tops them up. What functions learnt of their idle times is
//! saved in the registry every few minutes and when the node stops, and
//! given back to them when it starts again.

use crate::state::NodeState;
use nimbus_engine::ComponentDigest;
use std::sync::Arc;
use std::time::Duration;

/// How often idleness is checked at most: once a second, or twice per
/// `--scale-to-zero-after` or per bin of the idle-time histograms when that
/// is shorter.
const EVERY: Duration = Duration::from_secs(1);

/// How often idleness is checked at least, however short the idle time.
const FASTEST: Duration = Duration::from_millis(50);

/// How often what functions learnt of their idle times is saved: a node
/// that crashes loses at most this much of it (one that stops saves it).
const SAVE_EVERY: Duration = Duration::from_secs(300);

/// Trims idle instances and code until shutdown.
pub async fn run(
    state: Arc<NodeState>,
    unload_after: Option<Duration>,
    resolution: Option<Duration>,
    shutdown: tokio::sync::watch::Receiver<Option<Duration>>,
) {
    let finest = match (unload_after, resolution) {
        (Some(after), Some(bin)) => after.min(bin),
        (Some(after), None) => after,
        (None, _) => EVERY,
    };
    let period = (finest / 2).clamp(FASTEST, EVERY);
    let mut last_save = std::time::Instant::now();
    crate::every(period, shutdown, || {
        sweep(&state, unload_after);
        if resolution.is_some() && last_save.elapsed() >= SAVE_EVERY {
            last_save = std::time::Instant::now();
            let state = state.clone();
            tokio::task::spawn_blocking(move || save_idle_times(&state));
        }
    })
    .await;
    if resolution.is_some() {
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || save_idle_times(&state)).await;
    }
}

/// Saves what every deployed function learnt of its idle times (not that
/// of a removed function whose last requests are still finishing).
fn save_idle_times(state: &NodeState) {
    let table = state.gateway.table();
    let entries: Vec<(String, String)> = state
        .engine
        .idle_snapshots()
        .into_iter()
        .filter(|(name, _)| table.function(name).is_some())
        .filter_map(|(name, snapshot)| Some((name, serde_json::to_string(&snapshot).ok()?)))
        .collect();
    if let Err(e) = state.registry.save_idle_times(&entries) {
        tracing::warn!(error = %e, "cannot save the functions' idle times; a restart learns them again");
    }
}

/// Gives the deployed functions what they had learnt of their idle times
/// before the node stopped.
pub(crate) fn restore_idle_times(state: &NodeState) {
    let saved = match state.registry.idle_times() {
        Ok(saved) => saved,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the functions' saved idle times; they learn them again");
            return;
        }
    };
    let restored = saved
        .iter()
        .filter(|(name, text)| {
            serde_json::from_str::<nimbus_engine::keepalive::IdleSnapshot>(text)
                .is_ok_and(|snapshot| state.engine.restore_idle_snapshot(name, &snapshot))
        })
        .count();
    if restored > 0 {
        tracing::info!(functions = restored, "restored learnt idle times");
    }
}

fn sweep(state: &NodeState, unload_after: Option<Duration>) {
    let table = state.gateway.table();
    let mut unloaded = false;
    for d in table.functions() {
        let trimmed = d.runtime.trim(unload_after);
        if trimmed.load_ahead {
            tracing::info!(
                function = %d.name,
                version = d.version,
                "loading ahead of the next expected request"
            );
            let runtime = d.runtime.clone();
            tokio::spawn(async move { runtime.load_ahead().await });
        }
        if trimmed.unloaded {
            unloaded = true;
            tracing::info!(
                function = %d.name,
                version = d.version,
                instances = trimmed.instances,
                "scaled to zero"
            );
        }
    }
    if unloaded {
        // Code shared by several versions leaves memory with the last one.
        let keep: Vec<ComponentDigest> = table
            .functions()
            .filter(|d| d.runtime.is_loaded())
            .map(|d| d.runtime.spec().digest.clone())
            .collect();
        state.engine.retain_components(&keep);
    }
    state.warm_up();
}
