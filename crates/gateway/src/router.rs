//! The route table: a segment trie from path patterns to functions,
//! rebuilt on every deploy and swapped in atomically.
//!
//! Lookup walks the path once, preferring at each segment a literal child,
//! then a parameter, then a wildcard, backtracking only where a branch dead
//! ends, so its cost depends on the path's length, not on how many functions
//! are deployed.

use nimbus_manifest::route::{Route, Segment};
use std::collections::HashMap;
use std::sync::Arc;

struct Endpoint<T> {
    route: Route,
    target: Arc<T>,
}

struct Node<T> {
    literals: HashMap<String, Node<T>>,
    param: Option<Box<Node<T>>>,
    wildcard: Vec<Endpoint<T>>,
    here: Vec<Endpoint<T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            literals: HashMap::new(),
            param: None,
            wildcard: Vec::new(),
            here: Vec::new(),
        }
    }
}

/// A successful lookup.
pub struct Match<'a, T> {
    pub target: &'a Arc<T>,
    pub route: &'a Route,
    /// Parameter values by name, in pattern order.
    pub params: Vec<(String, String)>,
    /// What a trailing `*` matched (without a leading slash).
    pub rest: Option<String>,
}

/// The outcome of a lookup.
pub enum Lookup<'a, T> {
    Found(Match<'a, T>),
    /// Some route has this path but not this method; the allowed methods.
    MethodNotAllowed(Vec<String>),
    NotFound,
}

/// Routes of every deployed function.
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> Router<T> {
    /// Adds a route. Conflicts are refused before this point (at deploy).
    pub fn insert(&mut self, route: Route, target: Arc<T>) {
        let mut node = &mut self.root;
        for segment in route.path.segments() {
            match segment {
                Segment::Literal(lit) => node = node.literals.entry(lit.clone()).or_default(),
                Segment::Param(_) => node = node.param.get_or_insert_with(Box::default),
                Segment::Wildcard => {
                    node.wildcard.push(Endpoint { route, target });
                    self.len += 1;
                    return;
                }
            }
        }
        node.here.push(Endpoint { route, target });
        self.len += 1;
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finds the most specific route for `method` and `path`.
    pub fn lookup(&self, method: &str, path: &str) -> Lookup<'_, T> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let segments: Vec<&str> = if trimmed.is_empty() {
            Vec::new()
        } else {
            trimmed
                .strip_suffix('/')
                .unwrap_or(trimmed)
                .split('/')
                .collect()
        };
        let mut allowed = Vec::new();
        let mut values = Vec::new();
        match find(&self.root, &segments, method, &mut values, &mut allowed) {
            Some((endpoint, rest)) => {
                let names = endpoint
                    .route
                    .path
                    .segments()
                    .iter()
                    .filter_map(|s| match s {
                        Segment::Param(n) => Some(n.clone()),
                        _ => None,
                    });
                let params = names
                    .zip(values)
                    .map(|(n, v)| (n, percent_decode(v)))
                    .collect();
                Lookup::Found(Match {
                    target: &endpoint.target,
                    route: &endpoint.route,
                    params,
                    rest,
                })
            }
            None if allowed.is_empty() => Lookup::NotFound,
            None => {
                allowed.sort();
                allowed.dedup();
                Lookup::MethodNotAllowed(allowed)
            }
        }
    }
}

fn pick<'a, T>(
    endpoints: &'a [Endpoint<T>],
    method: &str,
    allowed: &mut Vec<String>,
) -> Option<&'a Endpoint<T>> {
    let found = endpoints.iter().find(|e| e.route.allows(method));
    if found.is_none() {
        for e in endpoints {
            allowed.extend(e.route.methods.iter().map(|m| m.as_str().to_owned()));
        }
    }
    found
}

fn find<'a, 'p, T>(
    node: &'a Node<T>,
    segments: &[&'p str],
    method: &str,
    values: &mut Vec<&'p str>,
    allowed: &mut Vec<String>,
) -> Option<(&'a Endpoint<T>, Option<String>)> {
    let Some((first, rest)) = segments.split_first() else {
        if let Some(e) = pick(&node.here, method, allowed) {
            return Some((e, None));
        }
        return pick(&node.wildcard, method, allowed).map(|e| (e, Some(String::new())));
    };
    if let Some(child) = node.literals.get(*first)
        && let Some(found) = find(child, rest, method, values, allowed)
    {
        return Some(found);
    }
    if let Some(child) = &node.param
        && !first.is_empty()
    {
        values.push(first);
        if let Some(found) = find(child, rest, method, values, allowed) {
            return Some(found);
        }
        values.pop();
    }
    pick(&node.wildcard, method, allowed).map(|e| (e, Some(segments.join("/"))))
}

/// Decodes the `%XX` escapes of a URL path or path segment (invalid
/// escapes stay as they are; `+` is itself). A query value decodes the
/// same once its `+`s are spaces.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_manifest::Method;

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
    fn percent_escapes_decode_and_invalid_ones_stay() {
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("caf%C3%A9+x"), "café+x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41%"), "A%");
    }

    fn router() -> Router<&'static str> {
        let mut r = Router::default();
        for (path, methods, name) in [
            ("/hello", &[][..], "hello"),
            ("/users/me", &[][..], "me"),
            ("/users/:id", &["GET"][..], "user-get"),
            ("/users/:id", &["POST"][..], "user-post"),
            ("/users/:id/files/*", &[][..], "files"),
            ("/static/*", &[][..], "static"),
            ("/", &[][..], "root"),
        ] {
            r.insert(route(path, methods), Arc::new(name));
        }
        r
    }

    fn found(
        r: &Router<&'static str>,
        method: &str,
        path: &str,
    ) -> (String, Vec<(String, String)>, Option<String>) {
        match r.lookup(method, path) {
            Lookup::Found(m) => (m.target.to_string(), m.params, m.rest),
            Lookup::MethodNotAllowed(a) => (format!("405 {a:?}"), vec![], None),
            Lookup::NotFound => ("404".into(), vec![], None),
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let r = router();
        assert_eq!(found(&r, "GET", "/hello").0, "hello");
        assert_eq!(found(&r, "GET", "/hello/").0, "hello");
        assert_eq!(found(&r, "GET", "/users/me").0, "me");
        let (name, params, _) = found(&r, "GET", "/users/a%20b");
        assert_eq!(
            (name.as_str(), params),
            ("user-get", vec![("id".into(), "a b".into())])
        );
        assert_eq!(found(&r, "POST", "/users/42").0, "user-post");
        assert_eq!(
            found(&r, "DELETE", "/users/42").0,
            "405 [\"GET\", \"POST\"]"
        );
        assert_eq!(found(&r, "HEAD", "/users/42").0, "user-get");
        let (name, params, rest) = found(&r, "GET", "/users/7/files/a/b.txt");
        assert_eq!(name, "files");
        assert_eq!(params, vec![("id".into(), "7".into())]);
        assert_eq!(rest.as_deref(), Some("a/b.txt"));
        assert_eq!(found(&r, "GET", "/static").2.as_deref(), Some(""));
        assert_eq!(found(&r, "GET", "/").0, "root");
        assert_eq!(found(&r, "GET", "/nope").0, "404");
        assert_eq!(r.len(), 7);
    }
}
