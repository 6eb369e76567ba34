//! The dashboard at `/ui` on the admin listener: three static files compiled
//! into the binary (`src/ui/`), so `cargo build` alone produces it. The page
//! itself holds nothing secret and is served without the token; everything
//! it shows comes from the admin API, which the page calls with the token
//! the user logs in with. A strict Content-Security-Policy allows only the
//! node's own scripts, styles and API.

use http::{HeaderValue, StatusCode, header};
use nimbus_gateway::Body;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The dashboard's answer for `path`, or `None` when it is not one of its
/// files.
pub fn serve(path: &str) -> Option<hyper::Response<Body>> {
    let (body, content_type) = match path {
        "/ui" | "/ui/" => {
            // The duration buckets the page computes percentiles with.
            let buckets: Vec<String> = nimbus_telemetry::DURATION_BUCKETS
                .iter()
                .map(f64::to_string)
                .collect();
            (
                INDEX.replace("{{BUCKETS}}", &buckets.join(",")),
                "text/html; charset=utf-8",
            )
        }
        "/ui/app.js" => (SCRIPT.to_owned(), "text/javascript; charset=utf-8"),
        "/ui/app.css" => (STYLE.to_owned(), "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut resp = hyper::Response::new(nimbus_gateway::full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_and_its_files_are_served_with_a_strict_policy() {
        let page = super::serve("/ui").unwrap();
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        assert!(
            page.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        assert!(super::serve("/ui/app.js").is_some());
        assert!(super::serve("/ui/app.css").is_some());
        assert!(super::serve("/ui/other").is_none());
        assert!(!super::INDEX.replace("{{BUCKETS}}", "").contains("{{"));
    }
}
