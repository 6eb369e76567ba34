//! The node's own log lines (one per invocation, plus its events), written
//! to stdout by a thread of their own.
//!
//! A request's thread only appends its formatted line to a shared buffer.
//! The first line after a quiet spell wakes the writer thread, which lets
//! lines gather for [`LINGER`] and writes them all with one system call.
//! Under load hundreds of lines share a write and a wake-up, and no
//! request waits for the terminal, the pipe or the file behind stdout.
//! With nothing to write, the writer thread sleeps without a timer.
//! Warnings and errors are urgent: they are written at once, with whatever
//! gathered before them, so the last words of a node that is about to be
//! killed are not left in memory.
//!
//! Nothing is dropped: when the output falls so far behind that
//! [`MAX_PENDING_BYTES`] are waiting, writers wait for it, as they would
//! writing to it directly. Dropping the [`Flusher`] writes what is left;
//! lines logged after that are written directly.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes waiting for the output at most: a few thousand lines, so a burst
/// never waits for a slow terminal, while a stalled output holds no more
/// memory than this.
pub const MAX_PENDING_BYTES: usize = 1 << 20;

/// How long the writer thread lets lines gather after the first: short
/// enough that a line shows without a noticeable delay, long enough that
/// a busy node writes (and wakes the thread) a couple of hundred times a
/// second rather than once per line. Waking it costs a request's thread a
/// system call, and on a small machine the thread's run takes a core from
/// the requests.
pub const LINGER: Duration = Duration::from_millis(5);

/// Lines written after the linger only while fewer bytes than this wait:
/// a burst that fills half the buffer is written at once, before writers
/// have to wait for room.
const LINGER_BELOW: usize = MAX_PENDING_BYTES / 2;

/// A buffer the writer thread keeps between batches at most; a bigger one
/// (left by a burst) is given back.
const KEEP_CAPACITY: usize = 64 << 10;

struct State {
    pending: Vec<u8>,
    /// The writer thread sleeps and must be woken for new lines.
    idle: bool,
    /// The writer thread lets lines gather, and must be woken for an
    /// urgent one.
    lingering: bool,
    /// An urgent line is pending.
    urgent: bool,
    /// Writers waiting for room.
    blocked: usize,
    /// The writer thread has stopped: write directly.
    closed: bool,
}

struct Shared<W> {
    /// [`LINGER`], but for tests.
    linger: Duration,
    state: Mutex<State>,
    /// New lines, or closing.
    wake: Condvar,
    /// Room in the buffer.
    drained: Condvar,
    /// The output: the writer thread's, or the callers' once closed.
    out: Mutex<W>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands out writers of whole lines; cheap to clone.
pub struct Lines<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for Lines<W> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// Stops the writer thread once every line given so far is written.
pub struct Flusher<W> {
    shared: Arc<Shared<W>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread for `out`.
pub fn spawn<W: Write + Send + 'static>(out: W) -> std::io::Result<(Lines<W>, Flusher<W>)> {
    spawn_lingering(out, LINGER)
}

fn spawn_lingering<W: Write + Send + 'static>(
    out: W,
    linger: Duration,
) -> std::io::Result<(Lines<W>, Flusher<W>)> {
    let shared = Arc::new(Shared {
        linger,
        state: Mutex::new(State {
            pending: Vec::new(),
            idle: false,
            lingering: false,
            urgent: false,
            blocked: 0,
            closed: false,
        }),
        wake: Condvar::new(),
        drained: Condvar::new(),
        out: Mutex::new(out),
    });
    let thread = std::thread::Builder::new()
        .name("nimbus-log".into())
        .spawn({
            let shared = shared.clone();
            move || run(&shared)
        })?;
    Ok((
        Lines {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run<W: Write>(shared: &Shared<W>) {
    let mut batch = Vec::new();
    loop {
        {
            let mut s = lock(&shared.state);
            while s.pending.is_empty() && !s.closed {
                s.idle = true;
                s = shared.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.idle = false;
            if s.pending.is_empty() {
                return;
            }
            if !s.closed && !s.urgent && s.pending.len() < LINGER_BELOW {
                s.lingering = true;
                s = shared
                    .wake
                    .wait_timeout_while(s, shared.linger, |s| {
                        !s.urgent && !s.closed && s.pending.len() < LINGER_BELOW
                    })
                    .map_or_else(|e| e.into_inner().0, |(s, _)| s);
                s.lingering = false;
            }
            s.urgent = false;
            std::mem::swap(&mut s.pending, &mut batch);
            if s.blocked > 0 {
                shared.drained.notify_all();
            }
        }
        let mut out = lock(&shared.out);
        // An output that fails (a closed pipe) loses what it was given,
        // as a direct write would.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        drop(out);
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
    }
}

impl<W: Write> Lines<W> {
    /// A writer for one line (tracing's formatter writes each event with
    /// one `write_all`).
    pub fn writer(&self) -> LineWriter<'_, W> {
        LineWriter {
            shared: &self.shared,
            urgent: false,
        }
    }

    /// A writer for a line to write at once (a warning or an error).
    pub fn urgent_writer(&self) -> LineWriter<'_, W> {
        LineWriter {
            shared: &self.shared,
            urgent: true,
        }
    }
}

/// Appends what it is given to the pending lines.
pub struct LineWriter<'a, W> {
    shared: &'a Shared<W>,
    urgent: bool,
}

impl<W: Write> Write for LineWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = lock(&self.shared.state);
        while !s.closed && !s.pending.is_empty() && s.pending.len() + buf.len() > MAX_PENDING_BYTES
        {
            s.blocked += 1;
            s = self
                .shared
                .drained
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
            s.blocked -= 1;
        }
        if s.closed {
            drop(s);
            return lock(&self.shared.out).write(buf);
        }
        let below = s.pending.len() < LINGER_BELOW;
        s.pending.extend_from_slice(buf);
        // A lingering writer thread is woken once: by the first urgent
        // line, or by the line that fills half the buffer.
        let filled = below && s.pending.len() >= LINGER_BELOW;
        if s.lingering && ((self.urgent && !s.urgent) || filled) {
            self.shared.wake.notify_one();
        }
        s.urgent |= self.urgent;
        if s.idle {
            s.idle = false;
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W> Drop for Flusher<W> {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_one();
        self.shared.drained.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records each write it was given.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(r: &Recorder) -> String {
        String::from_utf8(lock(&r.0).concat()).unwrap()
    }

    use std::time::Duration;

    #[test]
    fn every_line_from_every_thread_is_written_once_whole() {
        let out = Recorder::default();
        let (lines, flusher) = spawn(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let line = format!("thread {t} line {i}\n");
                        lines.writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flusher);
        let written = text(&out);
        let mut seen: Vec<&str> = written.lines().collect();
        assert_eq!(seen.len(), 8000);
        // Each thread's lines stay in its order.
        for t in 0..4 {
            let prefix = format!("thread {t} ");
            let mine: Vec<&str> = seen
                .iter()
                .copied()
                .filter(|l| l.starts_with(&prefix))
                .collect();
            let expected: Vec<String> = (0..2000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 8000);
    }

    /// An output that blocks until released.
    struct Gate(Arc<Mutex<()>>, Recorder);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = lock(&self.0);
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_that_gather_while_the_output_is_busy_share_one_write() {
        let gate = Arc::new(Mutex::new(()));
        let held = lock(&gate);
        let out = Recorder::default();
        let (lines, flusher) = spawn(Gate(gate.clone(), out.clone())).unwrap();
        for i in 0..500 {
            lines
                .writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(held);
        drop(flusher);
        let expected: String = (0..500).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text(&out), expected);
        // At most the lines taken before the output stalled, then the rest.
        assert!(lock(&out.0).len() <= 2, "{} writes", lock(&out.0).len());
    }

    #[test]
    fn a_stalled_output_makes_writers_wait_and_loses_nothing() {
        let gate = Arc::new(Mutex::new(()));
        let held = lock(&gate);
        let out = Recorder::default();
        let (lines, flusher) = spawn(Gate(gate.clone(), out.clone())).unwrap();
        let line = vec![b'x'; 1023];
        let writer = std::thread::spawn({
            let lines = lines.clone();
            move || {
                // Four times the bound: the writer must wait for the output.
                for _ in 0..(4 * MAX_PENDING_BYTES / 1024) {
                    let mut l = line.clone();
                    l.push(b'\n');
                    lines.writer().write_all(&l).unwrap();
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!writer.is_finished(), "the bound did not hold the writer");
        assert!(lock(&lines.shared.state).pending.len() <= MAX_PENDING_BYTES);
        drop(held);
        writer.join().unwrap();
        drop(flusher);
        assert_eq!(text(&out).len(), 4 * MAX_PENDING_BYTES);
    }

    #[test]
    fn an_urgent_line_cuts_the_linger_short() {
        let out = Recorder::default();
        // A linger no test outlasts: only an urgent line or closing
        // writes anything.
        let (lines, flusher) = spawn_lingering(out.clone(), Duration::from_secs(3600)).unwrap();
        lines.writer().write_all(b"info\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            lock(&out.0).is_empty(),
            "a plain line was written before the linger ended"
        );
        lines.urgent_writer().write_all(b"error\n").unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while lock(&out.0).is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*lock(&out.0), vec![b"info\nerror\n".to_vec()]);
        // Closing does not wait for the linger either.
        lines.writer().write_all(b"last\n").unwrap();
        drop(flusher);
        assert_eq!(text(&out), "info\nerror\nlast\n");
    }

    #[test]
    fn a_burst_that_fills_half_the_buffer_cuts_the_linger_short() {
        let out = Recorder::default();
        let (lines, _flusher) = spawn_lingering(out.clone(), Duration::from_secs(3600)).unwrap();
        let line = [b"y".repeat(1023), b"\n".to_vec()].concat();
        for _ in 0..LINGER_BELOW / 1024 {
            lines.writer().write_all(&line).unwrap();
        }
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while text(&out).len() < LINGER_BELOW && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(text(&out).len(), LINGER_BELOW);
    }

    #[test]
    fn lines_after_the_flusher_stopped_are_written_directly() {
        let out = Recorder::default();
        let (lines, flusher) = spawn(out.clone()).unwrap();
        lines.writer().write_all(b"before\n").unwrap();
        drop(flusher);
        lines.writer().write_all(b"after\n").unwrap();
        assert_eq!(text(&out), "before\nafter\n");
    }
}
