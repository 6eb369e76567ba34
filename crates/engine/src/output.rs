//! Function output: what a guest writes to stdout and stderr becomes log
//! lines tagged with the function and invocation, capped per line and per
//! invocation so a chatty guest cannot exhaust memory or disk.

use crate::limits::{MAX_OUTPUT_BYTES_PER_INVOCATION, MAX_OUTPUT_LINE_BYTES};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Identifies whose output a line is.
#[derive(Clone)]
pub(crate) struct OutputTag {
    pub sink: Option<Arc<dyn nimbus_telemetry::logs::LogSink>>,
    /// Secret values replaced in every line.
    pub redactor: nimbus_telemetry::redact::Redactor,
    /// The invocation's trace context (its span is the parent the function
    /// saw); written out only with a line.
    pub trace: Option<nimbus_telemetry::trace::TraceContext>,
    /// What started the invocation (`http`, `source`, `schedule`...).
    pub trigger: &'static str,
    pub function: Arc<str>,
    pub version: u64,
    pub invocation: Arc<str>,
}

struct Buffer {
    /// The invocation writing now; replaced when a reused instance starts
    /// its next one.
    tag: OutputTag,
    pending: Vec<u8>,
    written: usize,
    truncated: bool,
}

/// One output stream (stdout or stderr) of an instance, tagged with the
/// invocation it serves.
#[derive(Clone)]
pub(crate) struct FunctionOutput {
    stream: &'static str,
    buffer: Arc<Mutex<Buffer>>,
}

impl FunctionOutput {
    pub(crate) fn new(tag: OutputTag, stream: &'static str) -> Self {
        Self {
            stream,
            buffer: Arc::new(Mutex::new(Buffer {
                tag,
                pending: Vec::new(),
                written: 0,
                truncated: false,
            })),
        }
    }

    /// Starts the output of the instance's next invocation: what follows is
    /// tagged with `tag` and counts against a fresh per-invocation cap.
    pub(crate) fn begin(&self, tag: OutputTag) {
        if let Ok(mut buf) = self.buffer.lock() {
            buf.tag = tag;
            buf.pending.clear();
            buf.written = 0;
            buf.truncated = false;
        }
    }

    fn emit(&self, tag: &OutputTag, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let text = tag.redactor.text(line.trim_end_matches('\r'));
        let text = text.as_ref();
        tracing::info!(
            target: "nimbus::function",
            function = &*tag.function,
            version = tag.version,
            invocation_id = &*tag.invocation,
            trace_id = tag.trace.map(|t| t.trace_id_hex()),
            span_id = tag.trace.map(|t| t.span_id_hex()),
            trigger = tag.trigger,
            stream = self.stream,
            "{}",
            text
        );
        if let Some(sink) = &tag.sink {
            sink.line(nimbus_telemetry::logs::LogLine {
                seq: 0,
                at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or_default(),
                function: tag.function.to_string(),
                version: tag.version,
                invocation: tag.invocation.to_string(),
                stream: self.stream.to_owned(),
                text: text.to_owned(),
            });
        }
    }

    fn accept(&self, data: &[u8]) {
        let Ok(mut guard) = self.buffer.lock() else {
            return;
        };
        let buf = &mut *guard;
        if buf.truncated {
            return;
        }
        let room = MAX_OUTPUT_BYTES_PER_INVOCATION.saturating_sub(buf.written);
        let take = data.len().min(room);
        buf.written += take;
        let mut rest = &data[..take];
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            if buf.pending.is_empty() {
                self.emit(&buf.tag, line);
            } else {
                let room = MAX_OUTPUT_LINE_BYTES.saturating_sub(buf.pending.len());
                buf.pending.extend_from_slice(&line[..line.len().min(room)]);
                let whole = std::mem::take(&mut buf.pending);
                self.emit(&buf.tag, &whole);
            }
            rest = &tail[1..];
        }
        let room = MAX_OUTPUT_LINE_BYTES.saturating_sub(buf.pending.len());
        buf.pending.extend_from_slice(&rest[..rest.len().min(room)]);
        if take < data.len() {
            buf.truncated = true;
            let pending = std::mem::take(&mut buf.pending);
            if !pending.is_empty() {
                self.emit(&buf.tag, &pending);
            }
            self.emit(
                &buf.tag,
                format!("[nimbus: output truncated after {MAX_OUTPUT_BYTES_PER_INVOCATION} bytes]")
                    .as_bytes(),
            );
        }
    }

    /// Emits a final unterminated line, if any.
    pub(crate) fn flush_pending(&self) {
        let Ok(mut buf) = self.buffer.lock() else {
            return;
        };
        let pending = std::mem::take(&mut buf.pending);
        if !pending.is_empty() {
            self.emit(&buf.tag, &pending);
        }
    }
}

impl IsTerminal for FunctionOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for FunctionOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for FunctionOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.accept(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
