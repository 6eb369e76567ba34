//! A small JSON API: path parameters, query strings, JSON in and out, and
//! status codes.
//!
//! Routes (see nimbus.toml):
//! - `GET /api/greet/:name?shout=true` → `{"message": "Hello, NAME!"}`
//! - `POST /api/orders` with `{"item": "...", "quantity": N}` → 201 with the
//!   order and its total, 400 with an error for invalid JSON, 422 for a
//!   quantity of zero
//! - anything else under `/api/` → 404 as JSON
//!
//! Nimbus passes the parameters it matched as `nimbus-param-NAME` headers;
//! the function falls back to parsing the path itself, so it also runs
//! unchanged on other wasi:http hosts.

use serde::{Deserialize, Serialize};
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Api;

wasi::http::proxy::export!(Api);

#[derive(Deserialize)]
struct OrderRequest {
    item: String,
    quantity: u32,
}

#[derive(Serialize)]
struct Order {
    item: String,
    quantity: u32,
    unit_price_cents: u64,
    total_cents: u64,
}

fn send_json(out: ResponseOutparam, status: u16, value: &serde_json::Value) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"application/json".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    let Ok(stream) = body.write() else { return };
    let bytes = value.to_string().into_bytes();
    for chunk in bytes.chunks(4096) {
        if stream.blocking_write_and_flush(chunk).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

fn header(request: &IncomingRequest, name: &str) -> Option<String> {
    let values = request.headers().get(name);
    values
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn read_body(request: &IncomingRequest, limit: usize) -> Result<Vec<u8>, String> {
    let body = request.consume().map_err(|_| "body already read")?;
    let stream = body.stream().map_err(|_| "body has no stream")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(16 * 1024) {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() > limit {
                    return Err(format!("body larger than {limit} bytes"));
                }
            }
            Err(wasi::io::streams::StreamError::Closed) => return Ok(bytes),
            Err(e) => return Err(format!("reading the body failed: {e:?}")),
        }
    }
}

fn price_of(item: &str) -> u64 {
    // A stable pseudo-price per item, in cents.
    item.bytes()
        .fold(100u64, |acc, b| (acc * 31 + u64::from(b)) % 5000)
        + 100
}

impl wasi::exports::http::incoming_handler::Guest for Api {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_and_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query.as_str(), ""));
        let method = request.method();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();

        match (&method, segments.as_slice()) {
            (Method::Get, ["api", "greet", name]) => {
                let name =
                    header(&request, "nimbus-param-name").unwrap_or_else(|| (*name).to_owned());
                let shout = query.split('&').any(|kv| kv == "shout=true");
                let mut message = format!("Hello, {name}!");
                if shout {
                    message = message.to_uppercase();
                }
                send_json(out, 200, &serde_json::json!({ "message": message }));
            }
            (Method::Post, ["api", "orders"]) => {
                let body = match read_body(&request, 64 * 1024) {
                    Ok(b) => b,
                    Err(e) => return send_json(out, 413, &serde_json::json!({ "error": e })),
                };
                let order: OrderRequest = match serde_json::from_slice(&body) {
                    Ok(o) => o,
                    Err(e) => {
                        return send_json(
                            out,
                            400,
                            &serde_json::json!({ "error": format!("invalid order JSON: {e}") }),
                        );
                    }
                };
                if order.quantity == 0 {
                    return send_json(
                        out,
                        422,
                        &serde_json::json!({ "error": "quantity must be at least 1" }),
                    );
                }
                let unit = price_of(&order.item);
                let created = Order {
                    total_cents: unit * u64::from(order.quantity),
                    unit_price_cents: unit,
                    quantity: order.quantity,
                    item: order.item,
                };
                send_json(out, 201, &serde_json::json!(created));
            }
            _ => send_json(
                out,
                404,
                &serde_json::json!({ "error": format!("no such endpoint: {path}") }),
            ),
        }
    }
}
