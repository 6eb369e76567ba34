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

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() || b.iter().all(|x| *x == 0) {
        // No entropy source: still a valid, non-zero id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1)
            .to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % t.len()] | 1;
        }
    }
    b
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
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
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }

    pub fn trace_id_hex(&self) -> String {
        self.trace_id.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn span_id_hex(&self) -> String {
        self.span_id.iter().map(|b| format!("{b:02x}")).collect()
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
