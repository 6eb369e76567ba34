//! Keeping secrets out of what Nimbus shows: function output, stored
//! results and anything else a user can read back. A [`Redactor`] knows a
//! set of secret values (a function's configured secrets, the credentials a
//! request carried) and replaces each occurrence with `[redacted]`.

use std::borrow::Cow;
use std::sync::Arc;

/// What a redacted value reads as.
pub const REDACTED: &str = "[redacted]";

/// Values shorter than this are not redacted: they would blank out
/// ordinary text (a one-letter secret is no secret anyway).
pub const MIN_SECRET_BYTES: usize = 4;

/// Headers whose values are credentials, never shown nor logged.
pub fn sensitive_header(name: &str) -> bool {
    [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Replaces known secret values in text.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Arc<[String]>,
}

impl Redactor {
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_SECRET_BYTES)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self {
            secrets: secrets.into(),
        }
    }

    /// This redactor and `more` values besides.
    pub fn with(&self, more: impl IntoIterator<Item = String>) -> Self {
        Self::new(self.secrets.iter().cloned().chain(more))
    }

    /// This redactor and the credentials `headers` carry (a copy of the
    /// handle alone when they carry none).
    pub fn with_credentials<'a>(
        &self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let found = credentials(headers);
        if found.is_empty() {
            self.clone()
        } else {
            self.with(found)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every known secret replaced.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for s in self.secrets.iter() {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
        out
    }

    /// The value of header `name` as it may be shown.
    pub fn header<'a>(&self, name: &str, value: &'a str) -> Cow<'a, str> {
        if sensitive_header(name) {
            Cow::Borrowed(REDACTED)
        } else {
            self.text(value)
        }
    }
}

/// Parts of a credential shorter than this are not redacted on their own
/// (a cookie `theme=dark` would blank every "dark").
const MIN_PART_BYTES: usize = 8;

/// The credentials a request carries in its headers, each header value
/// and, for `Bearer`/`Basic` schemes and cookies, its parts, so output that
/// prints only the token is redacted too.
pub fn credentials<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in headers {
        if !sensitive_header(name) {
            continue;
        }
        out.push(value.to_owned());
        let cookie = name.to_ascii_lowercase().contains("cookie");
        let token = (!cookie)
            .then(|| value.split_once(' ').map(|(_, t)| t))
            .flatten();
        let cookies = value
            .split(';')
            .filter(|_| cookie)
            .filter_map(|c| c.split_once('=').map(|(_, v)| v));
        out.extend(
            token
                .into_iter()
                .chain(cookies)
                .map(str::trim)
                .filter(|p| p.len() >= MIN_PART_BYTES)
                .map(str::to_owned),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_credentials_are_replaced() {
        let r = Redactor::new(["s3cr3t-value".to_owned(), "ab".to_owned()]);
        assert_eq!(r.text("key=s3cr3t-value;"), "key=[redacted];");
        assert_eq!(r.text("ab stays"), "ab stays", "too short to redact");
        assert!(matches!(r.text("nothing"), Cow::Borrowed(_)));
        let creds = credentials([
            ("Authorization", "Bearer tok-123456"),
            ("cookie", "session=cookie-9876; theme=dark"),
            ("accept", "text/plain"),
        ]);
        let r = r.with(creds);
        assert_eq!(r.text("got tok-123456"), "got [redacted]");
        assert_eq!(
            r.text("Bearer tok-123456"),
            "[redacted]",
            "the whole value first"
        );
        assert_eq!(r.text("s=cookie-9876"), "s=[redacted]");
        assert_eq!(r.text("theme=dark"), "theme=dark", "short values stay");
        assert_eq!(r.header("Set-Cookie", "a=b"), REDACTED);
        assert_eq!(r.header("x-trace", "s3cr3t-value"), REDACTED);
    }
}
