//! `allowed_outbound_hosts` entries: `[scheme://]host[:port]`.
//!
//! Host is a name, an IP literal, `*.domain` (any subdomain of domain) or `*`
//! (any host). Port is a number or `*`; without one, a rule matches the
//! default port of the request's scheme. The engine decides what a rule lets
//! through, including the refusal of private addresses (see
//! `nimbus_engine::outbound`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A rule that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutboundRuleError {
    #[error("outbound rule `{0}`: scheme must be http or https")]
    Scheme(String),
    #[error("outbound rule `{0}`: host is empty")]
    EmptyHost(String),
    #[error("outbound rule `{0}`: port must be a number from 1 to 65535, or `*`")]
    Port(String),
    #[error(
        "outbound rule `{0}`: a rule names a host, not a path; remove everything after the host and port"
    )]
    Path(String),
    #[error(
        "outbound rule `{0}`: `*` may only stand alone or as the first label (`*.example.com`)"
    )]
    Wildcard(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// `*.suffix`: any subdomain of suffix.
    Suffix(String),
    /// An exact host name (lowercase).
    Name(String),
    /// An IP address literal.
    Ip(IpAddr),
}

/// One entry of `allowed_outbound_hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OutboundRule {
    text: String,
    /// `http` or `https`, or any scheme when absent.
    pub scheme: Option<String>,
    /// Which hosts the rule names.
    pub host: HostPattern,
    /// `None` matches the default port of the request's scheme; `Some(0)` any.
    pub port: Option<u16>,
}

impl TryFrom<String> for OutboundRule {
    type Error = OutboundRuleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<OutboundRule> for String {
    fn from(rule: OutboundRule) -> String {
        rule.text
    }
}

impl fmt::Display for OutboundRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for OutboundRule {
    type Err = OutboundRuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let owned = || text.to_owned();
        let (scheme, rest) = match text.split_once("://") {
            Some((s, rest)) => {
                let s = s.to_ascii_lowercase();
                if s != "http" && s != "https" {
                    return Err(OutboundRuleError::Scheme(owned()));
                }
                (Some(s), rest)
            }
            None => (None, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(OutboundRuleError::Path(owned()));
        }
        let (host, port) = split_host_port(rest);
        let port = match port {
            None => None,
            Some("*") => Some(0),
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => return Err(OutboundRuleError::Port(owned())),
            },
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(OutboundRuleError::EmptyHost(owned()));
        }
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(OutboundRuleError::Wildcard(owned()));
            }
            HostPattern::Suffix(suffix.to_owned())
        } else if host.contains('*') {
            return Err(OutboundRuleError::Wildcard(owned()));
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Ip(ip)
        } else {
            HostPattern::Name(host)
        };
        Ok(Self {
            text: text.to_owned(),
            scheme,
            host,
            port,
        })
    }
}

/// Splits `host[:port]`, understanding bracketed IPv6 literals.
fn split_host_port(text: &str) -> (&str, Option<&str>) {
    if let Some(end) = text.find(']') {
        let (host, rest) = text.split_at(end + 1);
        return (host, rest.strip_prefix(':'));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (text, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_rules_are_explained() {
        assert_eq!(
            "ftp://x".parse::<OutboundRule>(),
            Err(OutboundRuleError::Scheme("ftp://x".into()))
        );
        assert!(matches!(
            "https://x.com/path".parse::<OutboundRule>(),
            Err(OutboundRuleError::Path(_))
        ));
        assert!(matches!(
            "x.com:99999".parse::<OutboundRule>(),
            Err(OutboundRuleError::Port(_))
        ));
        assert!(matches!(
            "a.*.com".parse::<OutboundRule>(),
            Err(OutboundRuleError::Wildcard(_))
        ));
        let v6: OutboundRule = "http://[::1]:8080".parse().unwrap();
        assert_eq!(v6.host, HostPattern::Ip("::1".parse().unwrap()));
        assert_eq!(v6.port, Some(8080));
        let any: OutboundRule = "*:*".parse().unwrap();
        assert_eq!((any.host, any.port), (HostPattern::Any, Some(0)));
    }
}
