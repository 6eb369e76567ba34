//! W3C Trace Context (`traceparent`): parsing what callers send, starting a
//! trace when they send none, and deriving the span of each hop, so one
//! trace id follows work through the gateway, the function, its outbound
//! requests, asynchronous attempts and destinations.

/// The header carrying the context.
pub const TRACEPARENT: &str = "traceparent";

/// A trace id, the current span id and the trace flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

thread_local! {
    /// Per-thread id generator, seeded once from the operating system, so
    /// a request costs no system call for its ids.
    static IDS: std::cell::Cell<u64> = std::cell::Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: the clock and the thread still give distinct
        // streams.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1) as u64;
        let id = std::thread::current().id();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(t, id), &mut h);
        b = std::hash::Hasher::finish(&h).to_le_bytes();
    }
    u64::from_le_bytes(b)
}

/// The next 64 random bits (splitmix64 over the thread's state, seeded
/// once from the operating system): for ids, which need to be unique and
/// unpredictable enough to sample on, and for backoff jitter; never for
/// secrets.
pub fn next_u64() -> u64 {
    IDS.with(|state| {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// The span id of a minted context: a fixed mix of its trace id, never
/// zero.
fn minted_span(trace_id: &[u8; 16]) -> [u8; 8] {
    let (hi, lo) = trace_id.split_at(8);
    let word = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    let mixed = (word(hi) ^ word(lo).rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if mixed == 0 { 1u64 } else { mixed }.to_be_bytes()
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    for chunk in b.chunks_mut(8) {
        let r = next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    if b.iter().all(|x| *x == 0) {
        // All-zero ids are invalid in trace context.
        b[0] = 1;
    }
    b
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes lowercase hex of exactly `out.len()` bytes.
fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    let text = text.as_bytes();
    if text.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(())
}

/// Lowercase hex of `bytes`, appended to `out`.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

impl TraceContext {
    /// A new trace, sampled.
    pub fn root() -> Self {
        // One call to the entropy source for both ids.
        let bytes: [u8; 24] = random();
        let mut ctx = Self {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 1,
        };
        ctx.trace_id.copy_from_slice(&bytes[..16]);
        ctx.span_id.copy_from_slice(&bytes[16..]);
        ctx
    }

    /// A new trace for work queued before any span of it exists (an
    /// asynchronous invocation accepted without a caller's trace, a broker
    /// message without one). Its span id is derived from its trace id, so
    /// [`TraceContext::is_minted`] recognises it wherever the work runs:
    /// the work's spans are then the trace's roots, not children of a span
    /// that nobody records.
    pub fn mint() -> Self {
        let trace_id: [u8; 16] = random();
        Self {
            trace_id,
            span_id: minted_span(&trace_id),
            flags: 1,
        }
    }

    /// Whether this context was made by [`TraceContext::mint`] (a caller's
    /// span id matches by chance once in 2^64).
    pub fn is_minted(&self) -> bool {
        self.span_id == minted_span(&self.trace_id)
    }

    /// The span a hop of this context has for parent: none for a minted
    /// context, which stands for no recorded span.
    pub fn parent_span(&self) -> Option<[u8; 8]> {
        (!self.is_minted()).then_some(self.span_id)
    }

    /// The next hop of the same trace.
    pub fn child(&self) -> Self {
        Self {
            span_id: random(),
            ..*self
        }
    }

    /// Parses a `traceparent` value; `None` when invalid (then a new trace
    /// starts, as the specification asks).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let mut v = [0u8; 1];
        hex_into(version, &mut v)?;
        // Version 00 has exactly four fields; later versions may add more.
        if v[0] == 0xff || (v[0] == 0 && parts.next().is_some()) {
            return None;
        }
        let mut ctx = Self {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex_into(trace, &mut ctx.trace_id)?;
        hex_into(span, &mut ctx.span_id)?;
        let mut f = [0u8; 1];
        hex_into(flags, &mut f)?;
        ctx.flags = f[0];
        if ctx.trace_id == [0; 16] || ctx.span_id == [0; 8] {
            return None;
        }
        Some(ctx)
    }

    /// The `traceparent` value (version 00).
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }

    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }

    pub fn span_id_hex(&self) -> String {
        let mut out = String::with_capacity(16);
        push_hex(&mut out, &self.span_id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specification_example() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(v).unwrap();
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.flags, 1);
        assert_eq!(ctx.header(), v);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[test]
    fn minted_contexts_are_recognised_and_have_no_parent() {
        let minted = TraceContext::mint();
        assert!(minted.is_minted());
        assert_eq!(minted.parent_span(), None);
        // Through a stored header and back.
        let again = TraceContext::parse(&minted.header()).unwrap();
        assert!(again.is_minted());
        // Its hops, a new trace and a caller's context are ordinary spans.
        let child = minted.child();
        assert!(!child.is_minted());
        assert_eq!(child.parent_span(), Some(child.span_id));
        assert!(!TraceContext::root().is_minted());
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(!TraceContext::parse(v).unwrap().is_minted());
        assert_ne!(TraceContext::mint().trace_id, minted.trace_id);
    }

    #[test]
    fn refuses_invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
        assert_eq!(TraceContext::root().header().len(), 55);
    }
}
