//! Checks that an upload is a component Nimbus can serve, with errors that
//! say what is wrong in words a function author understands.

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};

/// The interface every function exports (any 0.2.x version).
pub(crate) const HANDLER_INTERFACE: &str = "wasi:http/incoming-handler@0.2";

/// Interfaces Nimbus links into every function: the `wasi:http/proxy` world
/// plus the `wasi:cli` and `wasi:filesystem` interfaces that the standard
/// library of most languages imports (they are given nothing: no arguments,
/// no preopened directories, no sockets).
const PROVIDED_PACKAGES: &[&str] = &[
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:http/types@",
    "wasi:http/outgoing-handler@",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

/// Why a component was refused.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error(
        "the upload is empty: build the function first (e.g. `cargo build --target wasm32-wasip2`)"
    )]
    Empty,
    #[error(
        "not a component: the file does not start with the WebAssembly magic bytes; upload the `.wasm` file your toolchain produced"
    )]
    NotWasm,
    #[error(
        "not a component: this is a core WebAssembly module; build for `wasm32-wasip2` or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("not a component: unsupported WebAssembly binary version or layer ({0})")]
    UnknownVersion(String),
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error(
        "the component does not export wasi:http/incoming-handler@0.2.x (exports: {exports}); a function must target the `wasi:http/proxy` world"
    )]
    MissingHandler { exports: String },
    #[error(
        "the component imports {0} which Nimbus does not provide; functions may import the `wasi:http/proxy` world plus wasi:cli, wasi:filesystem and wasi:sockets"
    )]
    UnsupportedImports(String),
    #[error("the component cannot be linked: {0}")]
    Link(String),
}

/// Checks the binary header: a component has the magic bytes, version 0x0d
/// and layer 1; a core module has version 1 and layer 0.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), ComponentError> {
    if bytes.is_empty() {
        return Err(ComponentError::Empty);
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(ComponentError::NotWasm);
    }
    match &bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(ComponentError::CoreModule),
        other => Err(ComponentError::UnknownVersion(hex::encode(other))),
    }
}

/// Checks what a compiled component imports and exports against the linker.
pub(crate) fn check_interfaces<T>(
    engine: &wasmtime::Engine,
    linker: &Linker<T>,
    component: &Component,
) -> Result<(), ComponentError> {
    let ty = component.component_type();
    let unsupported: Vec<String> = ty
        .imports(engine)
        .filter(|(name, _)| !PROVIDED_PACKAGES.iter().any(|p| name.starts_with(p)))
        .map(|(name, item)| match item.ty {
            ComponentItem::ComponentInstance(_) => format!("`{name}`"),
            _ => format!("`{name}` (not an interface instance)"),
        })
        .collect();
    if !unsupported.is_empty() {
        return Err(ComponentError::UnsupportedImports(unsupported.join(", ")));
    }
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    if !exports
        .iter()
        .any(|name| name.starts_with(HANDLER_INTERFACE))
    {
        let exports = if exports.is_empty() {
            "none".to_owned()
        } else {
            exports.join(", ")
        };
        return Err(ComponentError::MissingHandler { exports });
    }
    linker
        .instantiate_pre(component)
        .map(drop)
        .map_err(|e| ComponentError::Link(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_classified() {
        assert!(matches!(check_header(b""), Err(ComponentError::Empty)));
        assert!(matches!(
            check_header(b"hello world"),
            Err(ComponentError::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(ComponentError::CoreModule)
        ));
        assert!(matches!(
            check_header(b"\0asm\x0c\0\x01\0"),
            Err(ComponentError::UnknownVersion(_))
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
