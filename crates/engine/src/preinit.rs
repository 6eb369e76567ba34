//! Pre-initialisation of components that ask for it.
//!
//! A component that exports `wizer-initialize: func()` (the convention of
//! the Wizer pre-initialiser, which `wasmtime wizer` and the JavaScript and
//! Python component toolchains share) has that function run once, when its
//! optimised code is built, and the state it leaves behind (linear memories
//! and globals) becomes the starting state of every instance. An
//! interpreter that loads its runtime and the user's script in
//! `wizer-initialize` then starts each fresh instance with both in place,
//! from a copy-on-write image, instead of building them on every request.
//!
//! The component file stays as uploaded: on `wasmtime serve` or Spin it
//! runs the same code on its first request instead.

use std::time::Duration;
use wasmtime::component::{Component, ComponentNamedList, Instance, Lift, Linker, Lower, WasmList};
use wasmtime::{Store, Trap};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

/// The export a component names its initialisation function with.
pub(crate) const INIT_EXPORT: &str = "wizer-initialize";

/// Why a component was not pre-initialised; it then serves as it was built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PreinitError {
    #[error("the component cannot be snapshotted: {0}")]
    Unsupported(String),
    #[error("`{INIT_EXPORT}` failed: {0}")]
    Init(String),
    #[error("`{INIT_EXPORT}` did not finish within {0:?}")]
    Timeout(Duration),
}

/// Whether the component exports a function named [`INIT_EXPORT`] at its
/// top level. Reads only the section headers and export names.
pub(crate) fn exports_initializer(bytes: &[u8]) -> bool {
    use wasmparser::{ComponentExternalKind, Parser, Payload};
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else {
            return false;
        };
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports.into_iter().flatten() {
                    if export.name.name == INIT_EXPORT && export.kind == ComponentExternalKind::Func
                    {
                        return true;
                    }
                }
            }
            _ => {}
        }
    }
    false
}

/// Runs the component's [`INIT_EXPORT`] in `store` (whose engine compiles
/// the instrumented copy, and whose limits and epoch deadline bound the
/// run) and returns the component rewritten to start from the state it
/// left. `timeout` is only used to name the failure of an interrupted run.
pub(crate) fn preinitialize<T: Send + 'static>(
    linker: &Linker<T>,
    mut store: Store<T>,
    bytes: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, PreinitError> {
    let unsupported = |e: wasmtime::Error| PreinitError::Unsupported(format!("{e:#}"));
    let mut wizer = Wizer::new();
    // The export stays: the component's lifted function refers to the core
    // module's export of the same name, and calling it again is harmless.
    wizer.keep_init_func(true);
    let (context, instrumented) = wizer.instrument_component(bytes).map_err(unsupported)?;
    let component = Component::new(store.engine(), &instrumented).map_err(unsupported)?;
    let failed = |e: wasmtime::Error| match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PreinitError::Timeout(timeout),
        _ => PreinitError::Init(format!("{e:#}")),
    };
    // The host's WASI implementation expects a Tokio runtime; this one
    // lives on the compiling thread for the length of the run.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PreinitError::Init(format!("starting a runtime: {e}")))?;
    runtime.block_on(async {
        let instance = linker
            .instantiate_async(&mut store, &component)
            .await
            .map_err(failed)?;
        let init = instance
            .get_typed_func::<(), ()>(&mut store, INIT_EXPORT)
            .map_err(|e| PreinitError::Init(format!("{e:#}")))?;
        init.call_async(&mut store, ()).await.map_err(failed)?;
        let mut state = Snapshot {
            store: &mut store,
            instance,
            error: None,
        };
        let rewritten = wizer
            .snapshot_component(&context, &mut state)
            .await
            .map_err(unsupported)?;
        match state.error {
            Some(e) => Err(PreinitError::Unsupported(e)),
            None => Ok(rewritten),
        }
    })
}

/// The initialised instance, read through the accessors the instrumented
/// component exports. The first failure is kept, and fails the snapshot.
struct Snapshot<'a, T: 'static> {
    store: &'a mut Store<T>,
    instance: Instance,
    error: Option<String>,
}

impl<T: Send> Snapshot<'_, T> {
    async fn call<R, O>(
        &mut self,
        instance: &str,
        func: &str,
        read: impl FnOnce(&Store<T>, R) -> O,
    ) -> Option<O>
    where
        R: Lift + Send + Sync + 'static,
        (R,): ComponentNamedList + Lift,
        (): ComponentNamedList + Lower,
    {
        let result = async {
            let (_, parent) = self
                .instance
                .get_export(&mut *self.store, None, instance)
                .ok_or_else(|| format!("no export `{instance}`"))?;
            let (_, index) = self
                .instance
                .get_export(&mut *self.store, Some(&parent), func)
                .ok_or_else(|| format!("no export `{instance}#{func}`"))?;
            let typed = self
                .instance
                .get_typed_func::<(), (R,)>(&mut *self.store, index)
                .map_err(|e| format!("{e:#}"))?;
            let (value,) = typed
                .call_async(&mut *self.store, ())
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok::<_, String>(read(self.store, value))
        }
        .await;
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }
}

impl<T: Send> ComponentInstanceState for Snapshot<'_, T> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(store))
        })
        .await;
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, v: i32| v)
            .await
            .unwrap_or_default()
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, v: i64| v)
            .await
            .unwrap_or_default()
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, v: f32| v.to_bits())
            .await
            .unwrap_or_default()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, v: f64| v.to_bits())
            .await
            .unwrap_or_default()
    }
}
