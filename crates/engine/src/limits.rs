//! Named limits of the engine, each with the reason for its value.

use std::time::Duration;

/// Interval of the epoch ticker. Every guest checks the epoch at function
/// entries and loop back-edges; on each tick a running guest yields to the
/// async executor (so a busy guest never starves other requests on its worker
/// thread) and its deadline is checked. 10 ms bounds both the scheduling
/// latency added by a CPU-bound guest and the precision of timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long the epoch ticker keeps ticking once no guest runs before it
/// sleeps. Steady traffic then never pays a wake-up of the ticker's thread
/// per request, and an idle node still stops waking within a second.
pub const EPOCH_LINGER: Duration = Duration::from_secs(1);

/// Instances that may exist at once across all functions. Each slot reserves
/// address space (not memory) for its linear memory; 1,000 slots keep the
/// reservation far below the 128 TiB a 64-bit process can address while
/// leaving room for 10 functions at the default `max_concurrency` of 100.
pub const MAX_INSTANCES: u32 = 1_000;

/// Core instances inside one component. Components produced by today's
/// toolchains (Rust, componentize-py, jco) use a handful: the main module, a
/// shim, a fixup module and the adapter.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 50;

/// Linear memories inside one component (main module plus adapter, with room
/// to spare for multi-module components).
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 4;

/// Tables inside one component (function tables of each core module).
pub const MAX_TABLES_PER_COMPONENT: u32 = 20;

/// Largest linear memory a function may ask for (`memory` in nimbus.toml is
/// capped to this). The per-function cap is enforced by the store limiter;
/// this bounds the address space each pool slot reserves.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;

/// Elements of one table. Interpreter-based guests (Python, JavaScript) have
/// tens of thousands of functions in their indirect-call tables.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Bytes of a recycled memory slot kept resident and reset in place instead
/// of being returned to the kernel with `madvise` (whose TLB shootdown hits
/// every core). With the `PAGEMAP_SCAN` ioctl (Linux 6.7+, enabled when
/// available) only the pages a request actually dirtied are reset, so the
/// window can cover a typical guest's whole working set (Rust puts a 1 MiB
/// shadow stack first, then data and heap) at the cost of resetting just
/// those pages. Without the ioctl the whole window is `memset`, which is why
/// it is not larger.
pub const MEMORY_KEEP_RESIDENT_BYTES: usize = 2 << 20;

/// Same, for tables.
pub const TABLE_KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// Native stack available to wasm code. A deep recursion traps with a stack
/// overflow at this depth instead of touching the host's stack guard.
pub const MAX_WASM_STACK_BYTES: usize = 1 << 20;

/// How long a reusable instance waits for its next request before it is
/// dropped. Each idle instance holds a pool slot and its memory; half a
/// minute covers the gaps of steady traffic without keeping the peak of a
/// burst resident.
pub const IDLE_INSTANCE_KEEP: Duration = Duration::from_secs(30);

/// Prepared instances (instantiated ahead of a request, never used yet)
/// kept across all functions. A request that finds one skips instantiation
/// on its path; each holds a pool slot, so together they may take a tenth
/// of [`MAX_INSTANCES`] at most.
pub const MAX_PREPARED_INSTANCES: usize = MAX_INSTANCES as usize / 10;

/// Instances kept ready for functions with `prewarm`, across the node. They
/// are counted apart from [`MAX_PREPARED_INSTANCES`], so neither kind can
/// starve the other, and the node refuses a deploy whose `prewarm` values
/// add up to more: what a function was promised it always gets. Another
/// tenth of the pool.
pub const MAX_PREWARMED_INSTANCES: u32 = MAX_INSTANCES / 10;

/// How long a function with `prewarm` whose code could not be loaded (its
/// compiled artifact missing or unreadable) waits before warming tries
/// again. Requests still load the code on their own path; this only keeps
/// the idle sweep, which runs every second, from repeating the same error.
pub const PREWARM_RETRY_AFTER: Duration = Duration::from_secs(60);

/// No instance is prepared while this many instances exist: past half of
/// the pool, its slots are left to requests that need them now.
pub const PREPARE_BELOW_LIVE_INSTANCES: u64 = MAX_INSTANCES as u64 / 2;

/// Default timeout of one invocation when the manifest sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest line of function output kept; longer lines are cut with a marker.
pub const MAX_OUTPUT_LINE_BYTES: usize = 8 << 10;

/// Function output kept per invocation; past it output is dropped and one
/// marker line says how much.
pub const MAX_OUTPUT_BYTES_PER_INVOCATION: usize = 1 << 20;

/// Time allowed to open an outbound connection (TCP and TLS).
pub const OUTBOUND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a component's `wizer-initialize` may run when its optimised code is
/// built. It does once what each instance would otherwise do on its first
/// request, so it gets the default request timeout.
pub const PREINIT_TIMEOUT: Duration = DEFAULT_TIMEOUT;

/// Linear memory a component's `wizer-initialize` may grow to. What it
/// leaves becomes every instance's starting memory and part of the compiled
/// artifact, so it is held to a few interpreter heaps rather than to
/// [`MAX_MEMORY_BYTES`].
pub const PREINIT_MEMORY_BYTES: u64 = 256 << 20;
