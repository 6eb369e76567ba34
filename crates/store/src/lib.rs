//! `nimbus-store` owns the node's durable state behind traits, with an
//! embedded SQLite implementation as the default.
//!
//! [`Registry`] records which functions exist, every version deployed of
//! each (component digest plus configuration) and which version is active,
//! and keeps what each function learnt of its idle times across restarts.
//! A cluster mode implements the same trait on a shared engine; nothing
//! above this crate assumes the state is local.

use nimbus_manifest::{AppName, FunctionConfig, FunctionName};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("stored configuration of `{function}` v{version} is unreadable: {source}")]
    Corrupt {
        function: String,
        version: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("function `{0}` does not exist")]
    NoSuchFunction(String),
    #[error("function `{function}` has no version {version}")]
    NoSuchVersion { function: String, version: u64 },
    #[error("the store's lock was poisoned by a panic")]
    Poisoned,
}

/// One deployed version of a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionVersion {
    pub version: u64,
    /// sha256 of the component.
    pub digest: String,
    pub config: FunctionConfig,
    /// Unix time in milliseconds.
    pub created_at: i64,
}

/// A function and its active version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionRecord {
    pub name: FunctionName,
    pub app: AppName,
    pub active: FunctionVersion,
    pub updated_at: i64,
}

/// A new version to record for a function.
#[derive(Clone, Debug)]
pub struct Upsert {
    pub name: FunctionName,
    pub digest: String,
    pub config: FunctionConfig,
}

/// The registry of functions and their versions.
pub trait Registry: Send + Sync {
    /// Every function with its active version, by name.
    fn functions(&self) -> Result<Vec<FunctionRecord>, StoreError>;
    /// One function.
    fn function(&self, name: &FunctionName) -> Result<Option<FunctionRecord>, StoreError>;
    /// Every version of a function, oldest first.
    fn versions(&self, name: &FunctionName) -> Result<Vec<FunctionVersion>, StoreError>;
    /// Records new versions and removals of one app atomically: all or none.
    fn apply(
        &self,
        app: &AppName,
        upserts: &[Upsert],
        removals: &[FunctionName],
    ) -> Result<Vec<FunctionRecord>, StoreError>;
    /// Makes `version` the active version of `name`.
    fn activate(&self, name: &FunctionName, version: u64) -> Result<FunctionRecord, StoreError>;
    /// Removes a function and its versions. Returns whether it existed.
    fn remove(&self, name: &FunctionName) -> Result<bool, StoreError>;
    /// What functions learnt of their idle times (adaptive keep-alive), as
    /// saved by [`Registry::save_idle_times`]: by name, opaque text.
    fn idle_times(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Saves `entries` at once, each replacing its function's earlier
    /// record. Functions missing from `entries` keep theirs (one whose code
    /// could not be loaded still has what it learnt before); a function's
    /// record goes when the function is removed, and none is saved for a
    /// function that is not deployed.
    fn save_idle_times(&self, entries: &[(String, String)]) -> Result<(), StoreError>;
}

/// The embedded registry: one SQLite database in WAL mode, every write
/// synced before it returns.
pub struct SqliteRegistry {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    active_version INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (function, version)
);
CREATE TABLE IF NOT EXISTS idle_times (
    function TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    saved_at INTEGER NOT NULL
);
";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl SqliteRegistry {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut conn)
    }
}

fn parse_config(function: &str, version: u64, text: &str) -> Result<FunctionConfig, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Corrupt {
        function: function.to_owned(),
        version,
        source,
    })
}

fn version_of(
    row: &rusqlite::Row<'_>,
    offset: usize,
) -> rusqlite::Result<(u64, String, String, i64)> {
    Ok((
        row.get::<_, i64>(offset)? as u64,
        row.get(offset + 1)?,
        row.get(offset + 2)?,
        row.get(offset + 3)?,
    ))
}

const SELECT_FUNCTIONS: &str = "
SELECT f.name, f.app, f.updated_at, v.version, v.digest, v.config, v.created_at
FROM functions f JOIN versions v ON v.function = f.name AND v.version = f.active_version";

fn read_functions(
    conn: &Connection,
    filter: Option<&str>,
) -> Result<Vec<FunctionRecord>, StoreError> {
    let sql = match filter {
        Some(_) => format!("{SELECT_FUNCTIONS} WHERE f.name = ?1"),
        None => format!("{SELECT_FUNCTIONS} ORDER BY f.name"),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let map = |row: &rusqlite::Row<'_>| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
            version_of(row, 3)?,
        ))
    };
    let rows: Vec<_> = match filter {
        Some(name) => stmt.query_map([name], map)?.collect::<Result<_, _>>()?,
        None => stmt.query_map([], map)?.collect::<Result<_, _>>()?,
    };
    rows.into_iter()
        .map(
            |(name, app, updated_at, (version, digest, config, created_at))| {
                let config = parse_config(&name, version, &config)?;
                let corrupt = |what: String| StoreError::Corrupt {
                    function: name.clone(),
                    version,
                    source: serde_json::Error::io(std::io::Error::other(what)),
                };
                Ok(FunctionRecord {
                    name: FunctionName::try_from(name.clone())
                        .map_err(|e| corrupt(e.to_string()))?,
                    app: AppName::try_from(app).map_err(|e| corrupt(e.to_string()))?,
                    active: FunctionVersion {
                        version,
                        digest,
                        config,
                        created_at,
                    },
                    updated_at,
                })
            },
        )
        .collect()
}

impl Registry for SqliteRegistry {
    fn functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        self.with(|conn| read_functions(conn, None))
    }

    fn function(&self, name: &FunctionName) -> Result<Option<FunctionRecord>, StoreError> {
        self.with(|conn| Ok(read_functions(conn, Some(name.as_str()))?.pop()))
    }

    fn versions(&self, name: &FunctionName) -> Result<Vec<FunctionVersion>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT version, digest, config, created_at FROM versions WHERE function = ?1 ORDER BY version",
            )?;
            let rows: Vec<_> = stmt
                .query_map([name.as_str()], |row| version_of(row, 0))?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(version, digest, config, created_at)| {
                    Ok(FunctionVersion {
                        version,
                        digest,
                        config: parse_config(name.as_str(), version, &config)?,
                        created_at,
                    })
                })
                .collect()
        })
    }

    fn apply(
        &self,
        app: &AppName,
        upserts: &[Upsert],
        removals: &[FunctionName],
    ) -> Result<Vec<FunctionRecord>, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let now = now_ms();
            for up in upserts {
                let next: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE function = ?1",
                    [up.name.as_str()],
                    |row| row.get(0),
                )?;
                let config = serde_json::to_string(&up.config).map_err(|source| {
                    StoreError::Corrupt {
                        function: up.name.to_string(),
                        version: next as u64,
                        source,
                    }
                })?;
                tx.execute(
                    "INSERT INTO versions (function, version, digest, config, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![up.name.as_str(), next, up.digest, config, now],
                )?;
                tx.execute(
                    "INSERT INTO functions (name, app, active_version, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(name) DO UPDATE SET app = excluded.app, active_version = excluded.active_version, updated_at = excluded.updated_at",
                    params![up.name.as_str(), app.as_str(), next, now],
                )?;
            }
            for name in removals {
                tx.execute("DELETE FROM functions WHERE name = ?1", [name.as_str()])?;
                tx.execute("DELETE FROM versions WHERE function = ?1", [name.as_str()])?;
                tx.execute("DELETE FROM idle_times WHERE function = ?1", [name.as_str()])?;
            }
            tx.commit()?;
            read_functions(conn, None)
        })
    }

    fn activate(&self, name: &FunctionName, version: u64) -> Result<FunctionRecord, StoreError> {
        self.with(|conn| {
            let exists: Option<i64> = conn
                .query_row(
                    "SELECT version FROM versions WHERE function = ?1 AND version = ?2",
                    params![name.as_str(), version as i64],
                    |row| row.get(0),
                )
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::NoSuchVersion {
                    function: name.to_string(),
                    version,
                });
            }
            let changed = conn.execute(
                "UPDATE functions SET active_version = ?2, updated_at = ?3 WHERE name = ?1",
                params![name.as_str(), version as i64, now_ms()],
            )?;
            if changed == 0 {
                return Err(StoreError::NoSuchFunction(name.to_string()));
            }
            read_functions(conn, Some(name.as_str()))?
                .pop()
                .ok_or_else(|| StoreError::NoSuchFunction(name.to_string()))
        })
    }

    fn remove(&self, name: &FunctionName) -> Result<bool, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM functions WHERE name = ?1", [name.as_str()])?;
            tx.execute("DELETE FROM versions WHERE function = ?1", [name.as_str()])?;
            tx.execute(
                "DELETE FROM idle_times WHERE function = ?1",
                [name.as_str()],
            )?;
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn idle_times(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT function, data FROM idle_times")?;
            let rows = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn save_idle_times(&self, entries: &[(String, String)]) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            {
                // A function removed since `entries` were taken gets none.
                let mut insert = tx.prepare_cached(
                    "INSERT INTO idle_times (function, data, saved_at)
                     SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM functions WHERE name = ?1)
                     ON CONFLICT(function) DO UPDATE SET data = excluded.data, saved_at = excluded.saved_at",
                )?;
                let at = now_ms();
                for (function, data) in entries {
                    insert.execute(params![function, data, at])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FunctionName {
        s.parse().unwrap()
    }

    fn upsert(n: &str, digest: &str) -> Upsert {
        Upsert {
            name: name(n),
            digest: digest.into(),
            config: FunctionConfig::default(),
        }
    }

    #[test]
    fn versions_accumulate_and_survive_reopen() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let app: AppName = "shop".parse().unwrap();
        {
            let reg = SqliteRegistry::open(&path)?;
            reg.apply(&app, &[upsert("a", "d1"), upsert("b", "d2")], &[])?;
            reg.apply(&app, &[upsert("a", "d3")], &[name("b")])?;
            let rolled = reg.activate(&name("a"), 1)?;
            assert_eq!(rolled.active.digest, "d1");
        }
        let reg = SqliteRegistry::open(&path)?;
        let all = reg.functions()?;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].active.version, 1);
        assert_eq!(reg.versions(&name("a"))?.len(), 2);
        assert!(matches!(
            reg.activate(&name("a"), 9),
            Err(StoreError::NoSuchVersion { .. })
        ));
        assert!(reg.remove(&name("a"))?);
        assert!(reg.functions()?.is_empty());
        // Versions keep counting from where they were after a removal? No:
        // a removed function is gone with its history.
        reg.apply(&app, &[upsert("a", "d4")], &[])?;
        assert_eq!(reg.function(&name("a"))?.map(|f| f.active.version), Some(1));
        Ok(())
    }

    #[test]
    fn idle_times_are_saved_per_function_and_go_with_it() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let app: AppName = "shop".parse().unwrap();
        let entry = |n: &str, d: &str| (n.to_owned(), d.to_owned());
        {
            let reg = SqliteRegistry::open(&path)?;
            reg.apply(
                &app,
                &[upsert("a", "d1"), upsert("b", "d2"), upsert("c", "d3")],
                &[],
            )?;
            reg.save_idle_times(&[entry("a", "1"), entry("b", "2")])?;
            // b is missing (its code could not be loaded): it keeps its
            // record; z is not deployed: it gets none.
            reg.save_idle_times(&[entry("a", "3"), entry("c", "5"), entry("z", "6")])?;
        }
        let reg = SqliteRegistry::open(&path)?;
        let mut saved = reg.idle_times()?;
        saved.sort();
        assert_eq!(saved, [entry("a", "3"), entry("b", "2"), entry("c", "5")]);
        // Removed by a deploy or on its own: its idle times go too.
        reg.apply(&app, &[], &[name("a")])?;
        assert!(reg.remove(&name("b"))?);
        assert_eq!(reg.idle_times()?, [entry("c", "5")]);
        Ok(())
    }
}
