//! A function doing real work: reads a JSON batch of orders (about 10 KB in
//! the benchmark), totals it and answers with a JSON summary. Errors in the
//! body answer 400 with the reason.

use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
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

fn respond(out: ResponseOutparam, status: u16, content_type: &[u8], body: &[u8]) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[content_type.to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(out, Ok(response));
    let Ok(stream) = outgoing.write() else { return };
    for chunk in body.chunks(4096) {
        if stream.blocking_write_and_flush(chunk).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}

impl wasi::exports::http::incoming_handler::Guest for Json {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        match read_body(request).and_then(|b| json_transform::transform(&b)) {
            Ok(json) => respond(out, 200, b"application/json", &json),
            Err(e) => respond(out, 400, b"text/plain; charset=utf-8", e.as_bytes()),
        }
    }
}
