//! A large, interpreter-based function: a JavaScript engine (Boa) compiled
//! into the component, running a small handler script for every request,
//! as JavaScript functions on serverless platforms do. It stands for the
//! multi-megabyte components interpreters produce.
//!
//! The engine and the loaded script are kept for the instance's next
//! request: in a fresh instance per request that changes nothing, in a
//! reused instance (`reuse` in nimbus.toml) the interpreter starts once.
//!
//! The component also exports `wizer-initialize`, which starts the
//! interpreter and loads the script, as JavaScript toolchains for
//! components do. Nimbus runs it once when it builds the optimised code,
//! so every fresh instance starts with the interpreter ready; `wasmtime
//! serve` ignores the export and starts the interpreter on each request.

use boa_engine::{Context, JsString, JsValue, Source, js_string};
use std::cell::RefCell;
use wasi::http::types::{IncomingRequest, Method, ResponseOutparam};

struct Js;

wasi::http::proxy::export!(Js);

/// The function's source, as a user of a JavaScript runtime would write it.
const HANDLER: &str = r#"
function handle(method, path) {
  const words = ["Hello", "from", "Nimbus"];
  return JSON.stringify({ greeting: words.join(" ") + "!", method, path, length: path.length });
}
"#;

thread_local! {
    /// The interpreter with the handler loaded, once per instance.
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

wit_bindgen::generate!({
    inline: "
        package nimbus-bench:js;
        world js {
            export wizer-initialize: func();
        }
    ",
});

impl Guest for Js {
    fn wizer_initialize() {
        CONTEXT.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = start().ok();
            }
        });
    }
}

export!(Js);

/// Starts the interpreter and loads the handler script.
fn start() -> Result<Context, String> {
    let mut context = Context::default();
    context
        .eval(Source::from_bytes(HANDLER))
        .map_err(|e| e.to_string())?;
    Ok(context)
}

fn run(method: &str, path: &str) -> Result<String, String> {
    CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        let context = match slot.as_mut() {
            Some(context) => context,
            None => slot.insert(start()?),
        };
        call(context, method, path)
    })
}

fn call(context: &mut Context, method: &str, path: &str) -> Result<String, String> {
    let handle = context
        .global_object()
        .get(js_string!("handle"), context)
        .map_err(|e| e.to_string())?;
    let handle = handle.as_callable().ok_or("`handle` is not a function")?;
    let value = handle
        .call(
            &JsValue::undefined(),
            &[
                JsValue::from(JsString::from(method)),
                JsValue::from(JsString::from(path)),
            ],
            context,
        )
        .map_err(|e| e.to_string())?;
    value
        .to_string(context)
        .map(|s| s.to_std_string_escaped())
        .map_err(|e| e.to_string())
}

impl wasi::exports::http::incoming_handler::Guest for Js {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Head => "HEAD".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            Method::Patch => "PATCH".to_owned(),
            Method::Options => "OPTIONS".to_owned(),
            Method::Connect => "CONNECT".to_owned(),
            Method::Trace => "TRACE".to_owned(),
            Method::Other(m) => m,
        };
        let path = request.path_with_query().unwrap_or_default();
        match run(&method, &path) {
            Ok(json) => respond::respond(out, 200, b"application/json", (json + "\n").as_bytes()),
            Err(e) => respond::respond(
                out,
                500,
                b"text/plain; charset=utf-8",
                format!("script failed: {e}\n").as_bytes(),
            ),
        }
    }
}
