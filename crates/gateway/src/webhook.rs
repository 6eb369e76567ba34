//! Inbound webhook signatures: HMAC-SHA256 over the body (GitHub, generic)
//! or over `"<timestamp>.<body>"` with a replay window (Stripe). Every
//! comparison is constant-time (`ring::hmac::verify`).

use base64::Engine as _;
use http::HeaderMap;
use nimbus_manifest::{SignatureEncoding, Webhook, WebhookPreset};
use ring::hmac;

/// Why a webhook request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the request has no `{0}` header")]
    Missing(String),
    #[error("the `{header}` header is malformed: {reason}")]
    Malformed { header: String, reason: String },
    #[error("the signature does not match the body")]
    Mismatch,
    #[error(
        "the signed timestamp is {age_secs}s from now, beyond the tolerance of {tolerance_secs}s"
    )]
    Stale { age_secs: i64, tolerance_secs: u64 },
}

/// Checks requests of one webhook route.
pub struct Verifier {
    spec: Webhook,
    key: hmac::Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never appears in logs.
        f.debug_struct("Verifier")
            .field("header", &self.spec.header)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(spec: Webhook, secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            spec,
        }
    }

    pub fn spec(&self) -> &Webhook {
        &self.spec
    }

    /// Verifies `body` against the signature in `headers`; `now` is Unix
    /// seconds (for Stripe's replay window).
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Rejection> {
        let header = &self.spec.header;
        let value = headers
            .get(header.as_str())
            .ok_or_else(|| Rejection::Missing(header.clone()))?
            .to_str()
            .map_err(|_| self.malformed("not visible ASCII"))?
            .trim();
        match self.spec.preset {
            Some(WebhookPreset::Stripe) => self.verify_stripe(value, body, now),
            _ => {
                let encoded = value
                    .strip_prefix(self.spec.prefix.as_str())
                    .ok_or_else(|| {
                        self.malformed(&format!("expected it to start with `{}`", self.spec.prefix))
                    })?;
                let signature = self.decode(encoded)?;
                hmac::verify(&self.key, body, &signature).map_err(|_| Rejection::Mismatch)
            }
        }
    }

    fn verify_stripe(&self, value: &str, body: &[u8], now: i64) -> Result<(), Rejection> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in value.split(',') {
            match part.trim().split_once('=') {
                Some(("t", t)) => {
                    timestamp = Some(
                        t.parse::<i64>()
                            .map_err(|_| self.malformed("t is not a Unix timestamp"))?,
                    )
                }
                Some(("v1", sig)) => signatures.push(sig),
                _ => {}
            }
        }
        let t = timestamp.ok_or_else(|| self.malformed("no t= timestamp"))?;
        if signatures.is_empty() {
            return Err(self.malformed("no v1= signature"));
        }
        let tolerance = self.spec.tolerance.get().as_secs();
        let age = now - t;
        if age.unsigned_abs() > tolerance {
            return Err(Rejection::Stale {
                age_secs: age,
                tolerance_secs: tolerance,
            });
        }
        let mut signed = Vec::with_capacity(body.len() + 16);
        signed.extend_from_slice(t.to_string().as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(body);
        // Every candidate is checked, so timing does not reveal which
        // matched.
        let mut ok = false;
        for sig in signatures {
            if let Ok(bytes) = hex::decode(sig) {
                ok |= hmac::verify(&self.key, &signed, &bytes).is_ok();
            }
        }
        if ok { Ok(()) } else { Err(Rejection::Mismatch) }
    }

    fn decode(&self, encoded: &str) -> Result<Vec<u8>, Rejection> {
        match self.spec.encoding {
            SignatureEncoding::Hex => {
                hex::decode(encoded).map_err(|_| self.malformed("the signature is not hex"))
            }
            SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| self.malformed("the signature is not base64")),
        }
    }

    fn malformed(&self, reason: &str) -> Rejection {
        Rejection::Malformed {
            header: self.spec.header.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// Signs `body` as a sender would (hex), for tests and tools.
pub fn sign_hex(secret: &[u8], body: &[u8]) -> String {
    hex::encode(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn webhook(toml_text: &str) -> Webhook {
        toml::from_str(toml_text).unwrap()
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn github_documented_example() {
        // The example from GitHub's documentation on validating deliveries.
        let v = Verifier::new(
            webhook("preset = \"github\"\nsecret_env = \"S\""),
            b"It's a Secret to Everybody",
        );
        let good = headers(
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        );
        assert_eq!(v.verify(&good, b"Hello, World!", 0), Ok(()));
        assert_eq!(
            v.verify(&good, b"Hello, World?", 0),
            Err(Rejection::Mismatch)
        );
        assert!(matches!(
            v.verify(&HeaderMap::new(), b"Hello, World!", 0),
            Err(Rejection::Missing(_))
        ));
        let unprefixed = headers(
            "X-Hub-Signature-256",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        );
        assert!(matches!(
            v.verify(&unprefixed, b"Hello, World!", 0),
            Err(Rejection::Malformed { .. })
        ));
    }

    #[test]
    fn stripe_checks_timestamp_and_any_v1() {
        let v = Verifier::new(
            webhook("preset = \"stripe\"\nsecret_env = \"S\"\ntolerance = \"5m\""),
            b"whsec_test",
        );
        let body = br#"{"id":"evt_1"}"#;
        let t = 1_700_000_000i64;
        let sig = sign_hex(
            b"whsec_test",
            format!("{t}.{}", "{\"id\":\"evt_1\"}").as_bytes(),
        );
        let value = format!("t={t},v1=deadbeef,v1={sig},v0=ignored");
        let h = headers("Stripe-Signature", &value);
        assert_eq!(v.verify(&h, body, t + 10), Ok(()));
        assert!(matches!(
            v.verify(&h, body, t + 301),
            Err(Rejection::Stale { .. })
        ));
        assert_eq!(v.verify(&h, b"{}", t), Err(Rejection::Mismatch));
    }

    #[test]
    fn generic_base64_with_custom_header() {
        let v = Verifier::new(
            webhook("secret_env = \"S\"\nheader = \"X-Signature\"\nencoding = \"base64\""),
            b"k",
        );
        let raw = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"k"), b"data");
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw.as_ref());
        assert_eq!(v.verify(&headers("x-signature", &b64), b"data", 0), Ok(()));
        assert!(
            v.verify(&headers("x-signature", "%%%"), b"data", 0)
                .is_err()
        );
    }
}
