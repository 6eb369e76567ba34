//! Deciding what a deploy changes: a pure function of the registry's
//! current state and the desired state of one app, so it is tested without
//! a node.

use nimbus_api::{Change, DeployRequest};
use nimbus_manifest::route::RouteIndex;
use nimbus_manifest::{FunctionConfig, FunctionName};
use nimbus_store::FunctionRecord;

/// Why a deploy was refused before anything changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "function `{name}` belongs to app `{owner}`; rename it or remove it from `{owner}` first"
    )]
    NameTaken { name: String, owner: String },
    #[error(
        "route `{route}` of function `{name}` conflicts with route `{other_route}` of function `{other}`: a request could match both; change one path or give them different methods"
    )]
    RouteConflict {
        name: String,
        route: String,
        other: String,
        other_route: String,
    },
    #[error("`{0}` is not a component digest: expected 64 lowercase hex digits (sha256)")]
    BadDigest(String),
    #[error("function `{name}`: {reason}")]
    Invalid { name: String, reason: String },
    #[error(
        "prewarm adds up to {total} instances across the node ({functions}), more than the {max} it keeps ready: lower prewarm on some of them"
    )]
    PrewarmTotal {
        total: u64,
        max: u32,
        /// `name: prewarm` of each function that asks for some.
        functions: String,
    },
}

/// Refuses a set of active functions whose `prewarm` values add up past
/// what the node keeps ready ([`nimbus_engine::MAX_PREWARMED_INSTANCES`]),
/// so every function gets the instances it asks for. `active` is every
/// function the node would serve after the change.
pub fn check_prewarm<'a>(
    active: impl IntoIterator<Item = (&'a FunctionName, &'a FunctionConfig)>,
) -> Result<(), PlanError> {
    let mut asking: Vec<(&FunctionName, u32)> = active
        .into_iter()
        .map(|(name, config)| (name, config.prewarm.get()))
        .filter(|(_, n)| *n > 0)
        .collect();
    let total: u64 = asking.iter().map(|(_, n)| u64::from(*n)).sum();
    let max = nimbus_engine::MAX_PREWARMED_INSTANCES;
    if total <= u64::from(max) {
        return Ok(());
    }
    asking.sort();
    let functions = asking
        .iter()
        .map(|(name, n)| format!("{name}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(PlanError::PrewarmTotal {
        total,
        max,
        functions,
    })
}

/// One function's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: FunctionName,
    pub change: Change,
    pub digest: String,
    pub config: FunctionConfig,
}

/// Decides, per function, whether a deploy creates, updates, keeps or
/// removes it, and refuses it when it would break another app.
pub fn plan(current: &[FunctionRecord], request: &DeployRequest) -> Result<Vec<Step>, PlanError> {
    let mut steps = Vec::new();
    let by_name: std::collections::HashMap<&FunctionName, &FunctionRecord> =
        current.iter().map(|r| (&r.name, r)).collect();
    for (name, f) in &request.functions {
        if nimbus_engine::ComponentDigest::parse(&f.component).is_none() {
            return Err(PlanError::BadDigest(f.component.clone()));
        }
        f.config.check().map_err(|reason| PlanError::Invalid {
            name: name.to_string(),
            reason,
        })?;
        let existing = by_name.get(name).copied();
        if let Some(r) = existing
            && r.app != request.app
        {
            return Err(PlanError::NameTaken {
                name: name.to_string(),
                owner: r.app.to_string(),
            });
        }
        let change = match existing {
            None => Change::Created,
            Some(r) if r.active.digest == f.component && r.active.config == f.config => {
                Change::Unchanged
            }
            Some(_) => Change::Updated,
        };
        steps.push(Step {
            name: name.clone(),
            change,
            digest: f.component.clone(),
            config: f.config.clone(),
        });
    }
    // Routes must not conflict with other apps' functions, nor among
    // themselves.
    let others = current
        .iter()
        .filter(|r| r.app != request.app)
        .flat_map(|r| {
            r.active
                .config
                .routes
                .iter()
                .map(move |route| (&r.name, route))
        });
    let mut seen = RouteIndex::default();
    for (name, route) in others {
        // Routes already deployed were checked when they were.
        let _ = seen.insert(name, route);
    }
    for step in &steps {
        for route in &step.config.routes {
            if let Some((other, other_route)) = seen.insert(&step.name, route) {
                return Err(PlanError::RouteConflict {
                    name: step.name.to_string(),
                    route: route.to_string(),
                    other: other.to_string(),
                    other_route: other_route.to_string(),
                });
            }
        }
    }
    check_prewarm(
        current
            .iter()
            .filter(|r| r.app != request.app)
            .map(|r| (&r.name, &r.active.config))
            .chain(steps.iter().map(|s| (&s.name, &s.config))),
    )?;
    for r in current.iter().filter(|r| r.app == request.app) {
        if !request.functions.contains_key(&r.name) {
            steps.push(Step {
                name: r.name.clone(),
                change: Change::Removed,
                digest: r.active.digest.clone(),
                config: r.active.config.clone(),
            });
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_api::DeployFunction;
    use nimbus_manifest::Route;
    use nimbus_store::FunctionVersion;

    const D1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn config(route: &str) -> FunctionConfig {
        FunctionConfig {
            routes: vec![Route {
                webhook: None,
                format: Default::default(),
                path: route.parse().unwrap(),
                methods: vec![],
            }],
            ..Default::default()
        }
    }

    fn record(app: &str, name: &str, digest: &str, route: &str) -> FunctionRecord {
        FunctionRecord {
            name: name.parse().unwrap(),
            app: app.parse().unwrap(),
            active: FunctionVersion {
                version: 1,
                digest: digest.into(),
                config: config(route),
                created_at: 0,
            },
            updated_at: 0,
        }
    }

    fn request(app: &str, fns: &[(&str, &str, &str)]) -> DeployRequest {
        DeployRequest {
            app: app.parse().unwrap(),
            functions: fns
                .iter()
                .map(|(n, d, r)| {
                    (
                        n.parse().unwrap(),
                        DeployFunction {
                            component: d.to_string(),
                            config: config(r),
                        },
                    )
                })
                .collect(),
        }
    }

    fn changes(steps: &[Step]) -> Vec<(String, Change)> {
        steps
            .iter()
            .map(|s| (s.name.to_string(), s.change))
            .collect()
    }

    #[test]
    fn unchanged_functions_stay_and_missing_ones_go() {
        let current = [
            record("a", "f", D1, "/f"),
            record("a", "g", D1, "/g"),
            record("a", "h", D1, "/h"),
        ];
        let steps = plan(
            &current,
            &request("a", &[("f", D1, "/f"), ("g", D2, "/g"), ("new", D1, "/n")]),
        )
        .unwrap();
        assert_eq!(
            changes(&steps),
            vec![
                ("f".into(), Change::Unchanged),
                ("g".into(), Change::Updated),
                ("new".into(), Change::Created),
                ("h".into(), Change::Removed),
            ]
        );
    }

    #[test]
    fn prewarm_adds_up_across_the_node() {
        let warm = |app: &str, name: &str, route: &str, n: i64| {
            let mut r = record(app, name, D1, route);
            r.active.config.prewarm = n.try_into().unwrap();
            r
        };
        let current = [warm("a", "f", "/f", 60), warm("a", "g", "/g", 0)];
        let mut asking = request("b", &[("h", D1, "/h"), ("i", D1, "/i")]);
        for (name, n) in [("h", 30), ("i", 11)] {
            let f = asking.functions.get_mut(name).unwrap();
            f.config.prewarm = i64::from(n).try_into().unwrap();
        }
        let e = plan(&current, &asking).unwrap_err();
        assert_eq!(
            e,
            PlanError::PrewarmTotal {
                total: 101,
                max: 100,
                functions: "f: 60, h: 30, i: 11".into(),
            }
        );
        assert!(
            e.to_string().contains("prewarm adds up to 101 instances across the node (f: 60, h: 30, i: 11), more than the 100 it keeps ready: lower prewarm on some of them"),
            "{e}"
        );
        // Exactly the node's budget fits.
        asking.functions.get_mut("i").unwrap().config.prewarm = 10i64.try_into().unwrap();
        assert!(plan(&current, &asking).is_ok());
        // An app's redeploy counts its new values, not the ones it replaces,
        // nor those of the functions it removes.
        let current = [warm("a", "f", "/f", 60), warm("a", "g", "/g", 40)];
        let mut redeploy = request("a", &[("f", D1, "/f")]);
        redeploy.functions.get_mut("f").unwrap().config.prewarm = 100i64.try_into().unwrap();
        assert!(plan(&current, &redeploy).is_ok());
    }

    #[test]
    fn other_apps_are_protected() {
        let current = [record("a", "f", D1, "/f")];
        assert!(matches!(
            plan(&current, &request("b", &[("f", D1, "/x")])),
            Err(PlanError::NameTaken { .. })
        ));
        assert!(matches!(
            plan(&current, &request("b", &[("g", D1, "/f")])),
            Err(PlanError::RouteConflict { .. })
        ));
        assert!(matches!(
            plan(&current, &request("b", &[("g", "nope", "/g")])),
            Err(PlanError::BadDigest(_))
        ));
        // The app's own old routes do not conflict with its new ones.
        assert!(plan(&current, &request("a", &[("f2", D1, "/f")])).is_ok());
    }
}
