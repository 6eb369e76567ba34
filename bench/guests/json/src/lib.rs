//! A function doing real work: reads a JSON batch of orders (about 10 KB in
//! the benchmark), totals it and answers with a JSON summary. Errors in the
//! body answer 400 with the reason.

use respond::respond;
use wasi::http::types::{IncomingBody, IncomingRequest, ResponseOutparam};
use wasi::io::streams::StreamError;

struct Json;

wasi::http::proxy::export!(Json);

fn read_body(request: IncomingRequest) -> Result<Vec<u8>, String> {
    let body = request
        .consume()
        .map_err(|()| "the body was already taken")?;
    let mut data = Vec::new();
    {
        let stream = body.stream().map_err(|()| "the body has no stream")?;
        loop {
            match stream.blocking_read(64 << 10) {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
            }
        }
    }
    IncomingBody::finish(body);
    Ok(data)
}

impl wasi::exports::http::incoming_handler::Guest for Json {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        match read_body(request).and_then(|b| json_transform::transform(&b)) {
            Ok(json) => respond(out, 200, b"application/json", &json),
            Err(e) => respond(out, 400, b"text/plain; charset=utf-8", e.as_bytes()),
        }
    }
}
