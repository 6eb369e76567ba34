//! `nimbus-manifest` owns the `nimbus.toml` schema and every validated value
//! in it: function and app names, route patterns, limits and outbound rules.
//!
//! Configuration is inert data: parsing never touches the network or the
//! filesystem beyond reading the manifest itself, unknown keys are refused,
//! and every error names the file, line and column with a hint at the fix.
//! The same types describe a function on the admin API's wire, so the node
//! validates what it receives with exactly the rules the CLI applied.

pub mod alert;
pub mod bucket;
pub mod invocation;
pub mod limits;
pub mod names;
pub mod outbound;
pub mod route;
pub mod secret;
pub mod source;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use alert::{Alert, AlertMetric, Threshold};
pub use bucket::{BucketTrigger, ObjectChange};
pub use invocation::{
    CatchUp, Destination, Destinations, Period, RetryPolicy, Schedule, SignatureEncoding, Webhook,
    WebhookPreset,
};
pub use limits::{Limits, Prewarm, Reuse, Timeout};
pub use names::{AppName, BucketName, EnvName, FunctionName};
pub use outbound::OutboundRule;
pub use route::{Method, Route, RoutePattern};
pub use secret::SecretSource;
pub use source::{
    Amqp, BrokerUrl, Format, JetStream, Mqtt, MqttVersion, Nats, Operation, Postgres, RedisStream,
    Source, SourceKind, StartAt,
};

/// What a function is, apart from its code: the part of a function that the
/// node stores and serves from. Sent on the admin API with the component's
/// digest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub env: BTreeMap<EnvName, String>,
    /// Environment variables whose values are read on the node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<EnvName, SecretSource>,
    #[serde(default)]
    pub limits: Limits,
    /// Requests one instance serves, one at a time, before it is recycled
    /// (default 1: a fresh instance per request). Never shared across
    /// functions or versions.
    #[serde(default, skip_serializing_if = "Reuse::is_fresh")]
    pub reuse: Reuse,
    /// Instances kept ready ahead of requests (default 0). A function that
    /// sets it keeps its code loaded and never scales to zero.
    #[serde(default, skip_serializing_if = "Prewarm::is_none")]
    pub prewarm: Prewarm,
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<OutboundRule>,
    /// How asynchronous invocations are retried.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    pub retry: RetryPolicy,
    /// Where asynchronous results go.
    #[serde(default, skip_serializing_if = "Destinations::is_empty")]
    pub destinations: Destinations,
    /// Cron schedules that invoke the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    /// Brokers whose messages invoke the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// Buckets whose object changes invoke the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<BucketTrigger>,
    /// Thresholds on the function's measures, sent to webhooks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<Alert>,
}

impl FunctionConfig {
    /// Checks the rules that span several settings (each setting checks
    /// its own value as it is read).
    pub fn check(&self) -> Result<(), String> {
        limits::check_prewarm(self.prewarm, &self.limits)
    }
}

/// A parsed `nimbus.toml`.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The file it was read from.
    pub path: PathBuf,
    pub app: AppName,
    pub functions: BTreeMap<FunctionName, FunctionManifest>,
}

/// One function of a manifest.
#[derive(Clone, Debug)]
pub struct FunctionManifest {
    /// Path of the component, resolved against the manifest's directory.
    pub component: PathBuf,
    pub build: Option<BuildStep>,
    pub config: FunctionConfig,
}

/// How to build a function's component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStep {
    pub command: String,
    /// Directory to run it in, resolved against the manifest's directory.
    pub workdir: PathBuf,
}

/// An error in a manifest, located in its file.
#[derive(Debug, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no position (e.g. unreadable file).
    pub line: usize,
    pub column: usize,
    pub message: String,
    source_line: Option<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        if let Some(src) = &self.source_line {
            let gutter = self.line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{} | {}\n{:gutter$} | {}^",
                "",
                self.line,
                src,
                "",
                " ".repeat(self.column.saturating_sub(1))
            )?;
        }
        Ok(())
    }
}

impl ManifestError {
    fn at(file: &Path, text: &str, offset: Option<usize>, message: String) -> Self {
        let Some(offset) = offset else {
            return Self {
                file: file.to_owned(),
                line: 0,
                column: 0,
                message,
                source_line: None,
            };
        };
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..offset].chars().count() + 1;
        let source_line = text[line_start..].lines().next().map(str::to_owned);
        Self {
            file: file.to_owned(),
            line,
            column,
            message,
            source_line,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    app: RawApp,
    #[serde(default)]
    functions: BTreeMap<FunctionName, RawFunction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: AppName,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    component: PathBuf,
    #[serde(default)]
    build: Option<RawBuild>,
    #[serde(default)]
    routes: Vec<toml::Spanned<RouteEntry>>,
    #[serde(default)]
    env: BTreeMap<EnvName, String>,
    #[serde(default)]
    secrets: BTreeMap<EnvName, SecretSource>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    reuse: Reuse,
    #[serde(default)]
    prewarm: Prewarm,
    #[serde(default)]
    allowed_outbound_hosts: Vec<OutboundRule>,
    #[serde(default)]
    retry: RetryPolicy,
    #[serde(default)]
    destinations: Destinations,
    #[serde(default)]
    schedules: Vec<toml::Spanned<Schedule>>,
    #[serde(default)]
    sources: Vec<toml::Spanned<Source>>,
    #[serde(default)]
    buckets: Vec<toml::Spanned<BucketTrigger>>,
    #[serde(default)]
    alerts: Vec<toml::Spanned<Alert>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: String,
    #[serde(default)]
    workdir: Option<PathBuf>,
}

/// A route written either as a bare path or as `{ path, methods }`.
struct RouteEntry(Route);

impl<'de> Deserialize<'de> for RouteEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RouteEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path such as \"/hello\" or a table such as { path = \"/users/:id\", methods = [\"GET\"] }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RouteEntry, E> {
                let path = v.parse::<RoutePattern>().map_err(E::custom)?;
                Ok(RouteEntry(Route {
                    webhook: None,
                    format: Default::default(),
                    path,
                    methods: Vec::new(),
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RouteEntry, A::Error> {
                Route::deserialize(de::value::MapAccessDeserializer::new(map)).map(RouteEntry)
            }
        }
        d.deserialize_any(V)
    }
}

/// The position and key of the first item whose key repeats an earlier one.
fn first_repeat<T>(
    items: &[toml::Spanned<T>],
    key: impl Fn(&T) -> String,
) -> Option<(usize, String)> {
    let keys: Vec<String> = items.iter().map(|i| key(i.get_ref())).collect();
    (1..keys.len())
        .find(|&i| keys[..i].contains(&keys[i]))
        .map(|i| (items[i].span().start, keys[i].clone()))
}

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ManifestError::at(
                path,
                "",
                None,
                format!("cannot read the manifest: {e} (run `nimbus deploy` where nimbus.toml is, or pass its path)"),
            )
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates manifest `text`, as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ManifestError::at(path, text, offset, e.message().trim_end().to_owned())
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };

        let mut seen = route::RouteIndex::default();
        for (name, f) in &raw.functions {
            if let Some(both) = f.secrets.keys().find(|k| f.env.contains_key(*k)) {
                return Err(ManifestError::at(
                    path,
                    text,
                    None,
                    format!(
                        "function `{name}` sets {} in both env and secrets: keep one",
                        both.as_str()
                    ),
                ));
            }
            for spanned in &f.routes {
                let route = &spanned.get_ref().0;
                if let Some((other, existing)) = seen.insert(name, route) {
                    return Err(ManifestError::at(
                        path,
                        text,
                        Some(spanned.span().start),
                        format!(
                            "route `{route}` of function `{name}` conflicts with route `{existing}` of function `{other}`: a request could match both; change one path or give them different methods"
                        ),
                    ));
                }
            }
            let twice = first_repeat(&f.schedules, Schedule::key)
                .map(|(at, key)| (at, format!("the schedule `{key}` twice: remove one (it would fire twice per tick)")))
                .or_else(|| {
                    first_repeat(&f.sources, Source::key).map(|(at, key)| {
                        (at, format!("the source `{key}` twice: remove one (every message would run twice)"))
                    })
                })
                .or_else(|| {
                    first_repeat(&f.buckets, BucketTrigger::key).map(|(at, key)| {
                        (at, format!("two triggers on `{key}`: merge them (every change would run twice)"))
                    })
                })
                .or_else(|| {
                    first_repeat(&f.alerts, Alert::key).map(|(at, key)| {
                        (at, format!("the alert `{key}` twice: remove one (it would be sent twice)"))
                    })
                });
            if let Some((at, what)) = twice {
                return Err(ManifestError::at(
                    path,
                    text,
                    Some(at),
                    format!("function `{name}` has {what}"),
                ));
            }
        }

        let functions = raw
            .functions
            .into_iter()
            .map(|(name, f)| {
                let build = f.build.map(|b| BuildStep {
                    command: b.command,
                    workdir: base.join(b.workdir.unwrap_or_else(|| PathBuf::from("."))),
                });
                let config = FunctionConfig {
                    routes: f.routes.into_iter().map(|r| r.into_inner().0).collect(),
                    env: f.env,
                    secrets: f.secrets,
                    limits: f.limits,
                    reuse: f.reuse,
                    prewarm: f.prewarm,
                    allowed_outbound_hosts: f.allowed_outbound_hosts,
                    retry: f.retry,
                    destinations: f.destinations,
                    schedules: f
                        .schedules
                        .into_iter()
                        .map(toml::Spanned::into_inner)
                        .collect(),
                    sources: f
                        .sources
                        .into_iter()
                        .map(toml::Spanned::into_inner)
                        .collect(),
                    buckets: f
                        .buckets
                        .into_iter()
                        .map(toml::Spanned::into_inner)
                        .collect(),
                    alerts: f
                        .alerts
                        .into_iter()
                        .map(toml::Spanned::into_inner)
                        .collect(),
                };
                let component = base.join(f.component);
                (
                    name,
                    FunctionManifest {
                        component,
                        build,
                        config,
                    },
                )
            })
            .collect::<BTreeMap<FunctionName, FunctionManifest>>();
        // The rules that span several settings, as the node applies them.
        for (name, f) in &functions {
            if let Err(e) = f.config.check() {
                return Err(ManifestError::at(
                    path,
                    text,
                    None,
                    format!("function `{name}`: {e}"),
                ));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            app: raw.app.name,
            functions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(Path::new("dir/nimbus.toml"), text)
    }

    #[test]
    fn full_manifest_parses() {
        let m = parse(
            r#"
[app]
name = "shop"

[functions.hello]
component = "target/hello.wasm"
build = { command = "cargo build", workdir = "hello" }
routes = ["/hello", { path = "/users/:id", methods = ["get", "POST"] }]
env = { GREETING = "hi" }
allowed_outbound_hosts = ["https://api.example.com"]
limits = { memory = 64, timeout = "5s", max_concurrency = 4, max_body = 1, async_concurrency = 2 }
retry = { attempts = 5, initial_backoff = "200ms" }
destinations = { on_failure = { url = "https://hooks.example.com/failed" } }
schedules = [{ cron = "0 3 * * *", timezone = "Europe/Berlin", payload = "{}" }]

[functions.github]
component = "gh.wasm"
routes = [{ path = "/hooks/github", methods = ["POST"], webhook = { preset = "github", secret_env = "GH_SECRET" } }]
"#,
        )
        .unwrap();
        let f = &m.functions["hello"];
        assert_eq!(f.component, PathBuf::from("dir/target/hello.wasm"));
        assert_eq!(
            f.build.as_ref().unwrap().workdir,
            PathBuf::from("dir/./hello")
        );
        assert_eq!(f.config.routes.len(), 2);
        assert_eq!(f.config.routes[1].methods[0].as_str(), "GET");
        assert_eq!(f.config.limits.memory.get(), 64);
        assert_eq!(f.config.limits.timeout.get().as_secs(), 5);
        assert_eq!(f.config.retry.attempts, 5);
        assert_eq!(f.config.schedules[0].timezone.name(), "Europe/Berlin");
        let gh = &m.functions["github"].config;
        assert!(gh.routes[0].webhook.is_some());
        let json = serde_json::to_string(gh).unwrap();
        assert_eq!(serde_json::from_str::<FunctionConfig>(&json).unwrap(), *gh);
        // The wire form round-trips through JSON.
        let json = serde_json::to_string(&f.config).unwrap();
        let back: FunctionConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f.config);
    }

    #[test]
    fn prewarm_fits_the_function_concurrency() {
        let with = |settings: &str| {
            parse(&format!(
                "[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\n{settings}\n"
            ))
        };
        let m = with("prewarm = 4\nlimits = { max_concurrency = 4 }").unwrap();
        let config = &m.functions["f"].config;
        assert_eq!(config.prewarm.get(), 4);
        assert_eq!(config.check(), Ok(()));
        // Kept off the wire when unset, so stored configs compare equal.
        let plain = with("").unwrap();
        assert!(plain.functions["f"].config.prewarm.is_none());
        let json = serde_json::to_string(&plain.functions["f"].config).unwrap();
        assert!(!json.contains("prewarm"), "{json}");

        let e = with("prewarm = 5\nlimits = { max_concurrency = 4 }")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("function `f`: prewarm 5 is more than max_concurrency 4: lower prewarm or raise limits.max_concurrency"),
            "{e}"
        );
        let e = with("prewarm = -1").unwrap_err().to_string();
        assert!(
            e.contains("invalid prewarm -1: use a whole number from 0 to 100"),
            "{e}"
        );
        // The same rules hold for a configuration sent without a manifest.
        let sent = |json: &str| serde_json::from_str::<FunctionConfig>(json);
        assert!(sent(r#"{"prewarm": 101}"#).is_err());
        let config = sent(r#"{"prewarm": 9, "limits": {"max_concurrency": 8}}"#).unwrap();
        assert!(config.check().unwrap_err().contains("max_concurrency 8"));
    }

    #[test]
    fn defaults_apply() {
        let m = parse("[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\n").unwrap();
        let l = m.functions["f"].config.limits;
        assert_eq!(
            (
                l.memory.get(),
                l.timeout.get().as_secs(),
                l.max_concurrency.get()
            ),
            (128, 30, 100)
        );
    }

    #[test]
    fn unknown_keys_are_located() {
        let e = parse("[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\ntiemout = 3\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (5, 1), "{e}");
        assert!(e.message.contains("unknown field `tiemout`"), "{e}");
        assert!(
            e.message.contains("component"),
            "lists the expected fields: {e}"
        );
    }

    #[test]
    fn bad_values_are_located_with_a_fix() {
        let e = parse(
            "[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\nlimits = { memory = 0 }\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("from 1 to 4096"), "{e}");
        let e = parse("[app]\nname = \"a\"\n[functions.Bad_Name]\ncomponent = \"f.wasm\"\n")
            .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("lowercase"), "{e}");
        let e = parse(
            "[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\nroutes = [\"nope\"]\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (5, 11), "{e}");
        assert!(e.to_string().contains("dir/nimbus.toml:5:11"), "{e}");
    }

    #[test]
    fn duplicate_schedules_are_refused() {
        let e = parse(
            "[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\n[[functions.f.schedules]]\ncron = \"* * * * *\"\n[[functions.f.schedules]]\ncron = \"* * * * *\"\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn route_conflicts_are_refused() {
        let e = parse(
            "[app]\nname = \"a\"\n[functions.f]\ncomponent = \"f.wasm\"\nroutes = [\"/x/:id\"]\n[functions.g]\ncomponent = \"g.wasm\"\nroutes = [\"/x/:name\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("conflicts"), "{e}");
    }
}
