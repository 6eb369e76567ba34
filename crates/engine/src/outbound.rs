//! Outbound HTTP from functions: deny by default.
//!
//! A function may reach only the destinations its manifest lists in
//! `allowed_outbound_hosts`. Each rule is `[scheme://]host[:port]`, where host
//! is a name, an IP literal, `*.domain` (any subdomain) or `*` (any host).
//! Whatever the rules say, a destination whose *resolved* address is loopback,
//! private, link-local (169.254.169.254 included), unspecified, multicast or
//! otherwise not globally routable is refused, unless a rule names that IP
//! address literally (or the name `localhost` for loopback). The connection is
//! then made to the address that was checked, never re-resolved, so a DNS
//! answer cannot change between the check and the connect.

use crate::limits::OUTBOUND_CONNECT_TIMEOUT;
use http_body_util::BodyExt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, WasiBody};

pub use nimbus_manifest::outbound::{HostPattern, OutboundRule, OutboundRuleError};

/// Where a request wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

/// Why an outbound request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("{0} is not in allowed_outbound_hosts")]
    NotAllowed(String),
    #[error(
        "{host} resolves to {addr}, a {kind} address; list `{addr}` in allowed_outbound_hosts to allow it"
    )]
    SpecialAddress {
        host: String,
        addr: IpAddr,
        kind: &'static str,
    },
    #[error("{0} could not be resolved")]
    Unresolved(String),
}

/// The outbound rules of one function.
#[derive(Clone, Debug, Default)]
pub struct OutboundPolicy {
    rules: Vec<OutboundRule>,
}

impl OutboundPolicy {
    /// A policy allowing what `rules` list.
    pub fn new(rules: Vec<OutboundRule>) -> Self {
        Self { rules }
    }

    /// The rules, as written.
    pub fn rules(&self) -> &[OutboundRule] {
        &self.rules
    }

    fn matching(&self, dest: &Destination) -> impl Iterator<Item = &OutboundRule> {
        self.rules.iter().filter(move |rule| {
            let scheme_ok = rule.scheme.as_deref().is_none_or(|s| s == dest.scheme);
            let default_port = if dest.scheme == "https" { 443 } else { 80 };
            let port_ok = match rule.port {
                Some(0) => true,
                Some(p) => p == dest.port,
                None => dest.port == default_port,
            };
            let host = dest.host.trim_start_matches('[').trim_end_matches(']');
            let host_ok = match &rule.host {
                HostPattern::Any => true,
                HostPattern::Suffix(s) => {
                    host.len() > s.len() + 1
                        && host.ends_with(s.as_str())
                        && host.as_bytes()[host.len() - s.len() - 1] == b'.'
                }
                HostPattern::Name(n) => host.eq_ignore_ascii_case(n),
                HostPattern::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
            };
            scheme_ok && port_ok && host_ok
        })
    }

    /// Decides whether `dest` may be contacted at the resolved address `addr`.
    pub fn check(&self, dest: &Destination, addr: IpAddr) -> Result<(), Denial> {
        let mut matched = false;
        for rule in self.matching(dest) {
            matched = true;
            let explicit = match &rule.host {
                HostPattern::Ip(ip) => *ip == addr,
                HostPattern::Name(n) => n == "localhost" && addr.is_loopback(),
                _ => false,
            };
            if explicit {
                return Ok(());
            }
        }
        if !matched {
            return Err(Denial::NotAllowed(format!(
                "{}://{}:{}",
                dest.scheme, dest.host, dest.port
            )));
        }
        match special_kind(addr) {
            None => Ok(()),
            Some(kind) => Err(Denial::SpecialAddress {
                host: dest.host.clone(),
                addr,
                kind,
            }),
        }
    }

    /// Resolves `dest` and returns the first address allowed by the policy.
    pub async fn resolve(&self, dest: &Destination) -> Result<SocketAddr, Denial> {
        // Refuse early, before any DNS query, when no rule names the host.
        if self.matching(dest).next().is_none() {
            return Err(Denial::NotAllowed(format!(
                "{}://{}:{}",
                dest.scheme, dest.host, dest.port
            )));
        }
        let host = dest.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, dest.port)],
            Err(_) => tokio::net::lookup_host((host, dest.port))
                .await
                .map_err(|_| Denial::Unresolved(dest.host.clone()))?
                .collect(),
        };
        let mut first_denial = Denial::Unresolved(dest.host.clone());
        for (i, addr) in addrs.into_iter().enumerate() {
            match self.check(dest, addr.ip()) {
                Ok(()) => return Ok(addr),
                Err(denial) if i == 0 => first_denial = denial,
                Err(_) => {}
            }
        }
        Err(first_denial)
    }
}

/// Classifies addresses that are not globally routable.
pub fn special_kind(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return special_v4(v4);
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg0 & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg0 & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if seg0 == 0x0064 && v6.segments()[1] == 0xff9b {
                Some("NAT64")
            } else if seg0 == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn special_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if v4.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if v4.is_broadcast() || v4.is_multicast() || a >= 240 {
        Some("multicast or reserved")
    } else if a == 100 && (b & 0xc0) == 64 {
        Some("shared (carrier-grade NAT)")
    } else if a == 198 && (b & 0xfe) == 18 {
        Some("benchmarking")
    } else if v4.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

/// What a delivery to a URL returned.
#[derive(Debug)]
pub struct Delivered {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// At most `max_body` bytes of the response body.
    pub body: bytes::Bytes,
    pub truncated: bool,
}

/// POSTs `body` to `url`, an address the operator configured (a result
/// destination), so no guest policy applies. Gives up after `timeout`.
pub async fn deliver(
    url: &str,
    headers: &[(String, String)],
    body: bytes::Bytes,
    timeout: std::time::Duration,
    max_body: usize,
) -> Result<Delivered, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid url `{url}`: {e}"))?;
    let dest =
        destination(&uri).ok_or_else(|| format!("`{url}` is not an absolute http(s) URL"))?;
    let work = async {
        let host = dest.host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((host, dest.port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let mut builder = http::Request::builder()
            .method(http::Method::POST)
            .uri(uri.clone());
        for (k, v) in headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let authority = uri.authority().map_or(host, |a| a.as_str()).to_owned();
        let request = builder
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(
                http_body_util::Full::new(body)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let (response, conn) = send_to(addr, &dest, request)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(Box::into_pin(conn));
        let (parts, body) = response.into_parts();
        let mut body = body;
        let mut kept = Vec::new();
        let mut truncated = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the response of {url}: {e}"))?;
            if let Some(data) = frame.data_ref() {
                let room = max_body.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..data.len().min(room)]);
                if data.len() > room {
                    truncated = true;
                    break;
                }
            }
        }
        Ok(Delivered {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
                .collect(),
            body: kept.into(),
            truncated,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("{url} did not answer within {timeout:?}"))?
}

/// Sends `request` to `addr` (already checked), speaking TLS to `host` when
/// the scheme is https. Returns the response and the future driving the
/// connection, as `WasiHttpHooks::send_request` expects.
pub(crate) async fn send_to(
    addr: SocketAddr,
    dest: &Destination,
    mut request: http::Request<WasiBody>,
) -> Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
> {
    let tcp = tokio::time::timeout(
        OUTBOUND_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)?
    .map_err(HttpError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    if dest.scheme == "https" {
        let host = dest.host.trim_start_matches('[').trim_end_matches(']');
        let server_name = match host.parse::<IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::from(ip),
            Err(_) => rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|_| HttpError::HttpRequestUriInvalid)?,
        };
        let config = tls_config().ok_or(HttpError::TlsProtocolError)?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout(
            OUTBOUND_CONNECT_TIMEOUT,
            connector.connect(server_name, tcp),
        )
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Tls)?;
        exchange(TokioIo::new(tls), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<IO>(
    io: IO,
    request: http::Request<WasiBody>,
) -> Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let mut conn = Box::pin(conn);
    let send = sender.send_request(request);
    tokio::pin!(send);
    // Drive the connection while waiting for the response head.
    let (response, conn_done) = tokio::select! {
        response = &mut send => (response?, false),
        done = &mut conn => {
            done?;
            ((&mut send).await?, true)
        }
    };
    let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
    let io: Box<dyn Future<Output = Result<(), HttpError>> + Send> = Box::new(async move {
        if !conn_done {
            conn.await?;
        }
        Ok(())
    });
    Ok((response, io))
}

/// The TLS client configuration (webpki roots, ring), built once. `None`
/// only if the crypto provider supports no safe protocol version.
fn tls_config() -> Option<Arc<rustls::ClientConfig>> {
    static CONFIG: std::sync::OnceLock<Option<Arc<rustls::ClientConfig>>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .ok()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        })
        .clone()
}

/// Parses the destination of an outgoing request.
pub(crate) fn destination(uri: &http::Uri) -> Option<Destination> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some(Destination { scheme, host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> OutboundPolicy {
        OutboundPolicy::new(rules.iter().map(|r| r.parse().unwrap()).collect())
    }

    fn dest(scheme: &str, host: &str, port: u16) -> Destination {
        Destination {
            scheme: scheme.into(),
            host: host.into(),
            port,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_by_default() {
        let p = OutboundPolicy::default();
        assert!(matches!(
            p.check(&dest("https", "example.com", 443), ip("93.184.216.34")),
            Err(Denial::NotAllowed(_))
        ));
    }

    #[test]
    fn rules_match_scheme_host_and_port() {
        let p = policy(&["https://api.example.com", "*.svc.example.org:8443"]);
        let public = ip("93.184.216.34");
        assert!(
            p.check(&dest("https", "api.example.com", 443), public)
                .is_ok()
        );
        assert!(
            p.check(&dest("http", "api.example.com", 80), public)
                .is_err()
        );
        assert!(
            p.check(&dest("https", "api.example.com", 8443), public)
                .is_err()
        );
        assert!(
            p.check(&dest("http", "a.svc.example.org", 8443), public)
                .is_ok()
        );
        assert!(
            p.check(&dest("http", "svc.example.org", 8443), public)
                .is_err()
        );
        assert!(
            p.check(&dest("http", "evilsvc.example.org", 8443), public)
                .is_err()
        );
    }

    #[test]
    fn special_addresses_need_a_literal_rule() {
        let p = policy(&["*", "http://127.0.0.1:8080"]);
        let d = dest("http", "metadata.internal", 80);
        for addr in [
            "169.254.169.254",
            "10.0.0.1",
            "127.0.0.2",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "fd00::1",
        ] {
            assert!(
                matches!(p.check(&d, ip(addr)), Err(Denial::SpecialAddress { .. })),
                "{addr} should be refused"
            );
        }
        assert!(
            p.check(&dest("http", "127.0.0.1", 8080), ip("127.0.0.1"))
                .is_ok()
        );
        assert!(
            p.check(&dest("http", "127.0.0.1", 8081), ip("127.0.0.1"))
                .is_err()
        );
        // A name that resolves to a private address is refused even when
        // listed by name: only the literal address opens it.
        let named = policy(&["http://internal.example.com"]);
        assert!(
            named
                .check(
                    &dest("http", "internal.example.com", 80),
                    ip("192.168.1.10")
                )
                .is_err()
        );
    }
}
