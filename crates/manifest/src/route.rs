//! HTTP route patterns: `/literal`, `/:param` segments and a trailing `/*`.
//!
//! Matching picks the most specific route: segment by segment from the left,
//! a literal beats a parameter, which beats the wildcard. Two routes conflict
//! when they have the same shape (the same literals, parameters and wildcard
//! in the same places, whatever the parameters are called) and their methods
//! overlap: no request could tell them apart.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// One segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Segment {
    Literal(String),
    Param(String),
    /// `*`: the rest of the path (zero or more segments); only last.
    Wildcard,
}

/// A parsed route pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoutePattern {
    text: String,
    segments: Vec<Segment>,
}

/// Why a pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid route `{pattern}`: {reason}")]
pub struct RouteError {
    pattern: String,
    reason: String,
}

impl RoutePattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Shape used for conflict detection: parameter names erased.
    pub fn shape(&self) -> Vec<Segment> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Param(_) => Segment::Param(String::new()),
                other => other.clone(),
            })
            .collect()
    }
}

impl TryFrom<String> for RoutePattern {
    type Error = RouteError;

    fn try_from(text: String) -> Result<Self, RouteError> {
        let fail = |reason: &str| RouteError {
            pattern: text.clone(),
            reason: reason.to_owned(),
        };
        if !text.starts_with('/') {
            return Err(fail("a route starts with `/` (e.g. `/hello`)"));
        }
        if text.contains(['?', '#', ' ']) {
            return Err(fail(
                "a route is a path only: remove any query, fragment or space",
            ));
        }
        let mut segments = Vec::new();
        let mut params = BTreeSet::new();
        let parts: Vec<&str> = text[1..].split('/').collect();
        let count = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let last = i + 1 == count;
            if part.is_empty() {
                if last {
                    // "/" or a trailing slash: nothing more to match.
                    break;
                }
                return Err(fail("empty segment (`//`)"));
            }
            if part == "*" {
                if !last {
                    return Err(fail("`*` may only be the last segment (e.g. `/static/*`)"));
                }
                segments.push(Segment::Wildcard);
            } else if let Some(name) = part.strip_prefix(':') {
                let ok = !name.is_empty()
                    && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(fail(
                        "a parameter is `:` followed by a name of letters, digits and underscores (e.g. `/users/:id`)",
                    ));
                }
                if !params.insert(name.to_owned()) {
                    return Err(fail("the same parameter name appears twice"));
                }
                segments.push(Segment::Param(name.to_owned()));
            } else if part.contains(['*', ':']) {
                return Err(fail(
                    "`*` and `:` must stand alone as a whole segment (`/files/*`, `/users/:id`)",
                ));
            } else {
                segments.push(Segment::Literal(part.to_owned()));
            }
        }
        Ok(Self { text, segments })
    }
}

impl std::str::FromStr for RoutePattern {
    type Err = RouteError;
    fn from_str(s: &str) -> Result<Self, RouteError> {
        Self::try_from(s.to_owned())
    }
}

impl From<RoutePattern> for String {
    fn from(p: RoutePattern) -> String {
        p.text
    }
}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An HTTP method token, uppercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Method(String);

impl Method {
    /// The method as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Method {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let upper = s.to_ascii_uppercase();
        let ok =
            !upper.is_empty() && upper.len() <= 16 && upper.bytes().all(|b| b.is_ascii_uppercase());
        if ok {
            Ok(Self(upper))
        } else {
            Err(format!(
                "invalid HTTP method `{s}`: use a method name such as GET, POST, PUT, PATCH or DELETE"
            ))
        }
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.0
    }
}

/// A route of a function: a pattern and the methods it answers (all when
/// `methods` is empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: RoutePattern,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
    /// Signature verification: a webhook route answers 202 to a verified
    /// request and runs the function asynchronously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::Webhook>,
    /// `s3`: requests are S3 event notifications (as MinIO's webhook target
    /// and S3 send them); each record becomes its own asynchronous
    /// `object.created` or `object.deleted` invocation.
    #[serde(default, skip_serializing_if = "crate::Format::is_default")]
    pub format: crate::Format,
}

impl Route {
    /// Whether two routes could match the same request.
    pub fn conflicts_with(&self, other: &Route) -> bool {
        if self.path.shape() != other.path.shape() {
            return false;
        }
        self.methods.is_empty()
            || other.methods.is_empty()
            || self.methods.iter().any(|m| other.methods.contains(m))
    }

    /// Whether the route answers `method`.
    pub fn allows(&self, method: &str) -> bool {
        self.methods.is_empty()
            || self.methods.iter().any(|m| m.as_str() == method)
            || (method == "HEAD" && self.methods.iter().any(|m| m.as_str() == "GET"))
    }
}

/// Routes indexed by shape, so a route is compared only with those it
/// could conflict with: checking the routes of 10,000 functions takes
/// linear time instead of comparing every pair.
#[derive(Debug)]
pub struct RouteIndex<'a, K> {
    by_shape: std::collections::HashMap<Vec<Segment>, Vec<(K, &'a Route)>>,
}

impl<K> Default for RouteIndex<'_, K> {
    fn default() -> Self {
        Self {
            by_shape: std::collections::HashMap::new(),
        }
    }
}

impl<'a, K> RouteIndex<'a, K> {
    /// Adds `route` under `key`, unless it conflicts with a route already
    /// there: then that route and its key are returned, and nothing is
    /// added.
    pub fn insert(&mut self, key: K, route: &'a Route) -> Option<(&K, &'a Route)> {
        let same_shape = self.by_shape.entry(route.path.shape()).or_default();
        match same_shape.iter().position(|(_, r)| r.conflicts_with(route)) {
            Some(i) => same_shape.get(i).map(|(k, r)| (k, *r)),
            None => {
                same_shape.push((key, route));
                None
            }
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.methods.is_empty() {
            write!(f, "{}", self.path)
        } else {
            let methods: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
            write!(f, "{} {}", methods.join(","), self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, methods: &[&str]) -> Route {
        Route {
            webhook: None,
            format: Default::default(),
            path: path.parse().unwrap(),
            methods: methods
                .iter()
                .map(|m| Method::try_from(m.to_string()).unwrap())
                .collect(),
        }
    }

    #[test]
    fn patterns_parse() {
        let p: RoutePattern = "/users/:id/files/*".parse().unwrap();
        assert_eq!(
            p.segments(),
            &[
                Segment::Literal("users".into()),
                Segment::Param("id".into()),
                Segment::Literal("files".into()),
                Segment::Wildcard
            ]
        );
        assert!("/".parse::<RoutePattern>().unwrap().segments().is_empty());
        for bad in ["hello", "/a//b", "/*/a", "/a*", "/:", "/:a/:a", "/x?y=1"] {
            assert!(bad.parse::<RoutePattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn conflicts_need_same_shape_and_overlapping_methods() {
        assert!(route("/users/:id", &[]).conflicts_with(&route("/users/:name", &["GET"])));
        assert!(!route("/users/:id", &["GET"]).conflicts_with(&route("/users/:id", &["POST"])));
        assert!(!route("/users/me", &[]).conflicts_with(&route("/users/:id", &[])));
        assert!(route("/a/*", &[]).conflicts_with(&route("/a/*", &[])));
    }

    #[test]
    fn the_index_finds_the_route_a_new_one_conflicts_with() {
        let routes = [
            route("/users/:id", &["GET"]),
            route("/users/me", &[]),
            route("/users/:id", &["POST"]),
            route("/users/:name", &[]),
        ];
        let mut index = RouteIndex::default();
        assert!(index.insert("a", &routes[0]).is_none());
        assert!(index.insert("b", &routes[1]).is_none());
        assert!(index.insert("c", &routes[2]).is_none());
        let (key, existing) = index.insert("d", &routes[3]).unwrap();
        assert_eq!((*key, existing), ("a", &routes[0]));
        // The refused route was not added.
        assert!(index.insert("e", &route("/users/:x", &["PUT"])).is_none());
    }
}
