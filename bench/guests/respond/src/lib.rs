//! Answering a wasi:http request in one call, for the benchmark's guests.

use wasi::http::types::{Fields, OutgoingBody, OutgoingResponse, ResponseOutparam};

/// Sends `status` with `body` (written in 4 KiB chunks, the most one
/// write may carry) and finishes the response.
pub fn respond(out: ResponseOutparam, status: u16, content_type: &[u8], body: &[u8]) {
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
