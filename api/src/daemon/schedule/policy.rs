//! The store of installed policies (`<data_dir>/policies/<name>.toml`, the source exactly
//! as applied, plus `state.json` with when each was applied and last run). The file format
//! and its validation are `crate::wire::policy`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::daemon::error::{ApiError, ApiResult};
use crate::wire::cron::{is_due, Schedule};
use crate::wire::policy::{describe, parse, Policy, PolicyInfo};

/// When a policy was applied and last fired (persisted in `state.json`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RunState {
    applied: i64,
    last_run: Option<i64>,
}

struct Installed {
    policy: Policy,
    schedule: Schedule,
    source: String,
    run: RunState,
}

impl Installed {
    fn info(&self) -> PolicyInfo {
        let since = self.run.last_run.unwrap_or(self.run.applied);
        PolicyInfo {
            policy: self.policy.clone(),
            source: self.source.clone(),
            applied: self.run.applied,
            last_run: self.run.last_run,
            next_run: self
                .policy
                .enabled
                .then(|| self.schedule.next_after(since))
                .flatten(),
        }
    }
}

/// The installed policies; persisted under a directory, or in memory only.
#[derive(Default)]
pub struct PolicyStore {
    dir: Option<PathBuf>,
    inner: Mutex<BTreeMap<String, Installed>>,
}

impl fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PolicyStore {
    /// A store that forgets everything on restart (tests, embedded use).
    pub fn in_memory() -> Self {
        PolicyStore::default()
    }

    /// Opens (creates) `dir` and loads every `*.toml` in it; a file that no longer
    /// validates is skipped with an error in the log.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("creating policy dir {}: {e}", dir.display()))?;
        let states: BTreeMap<String, RunState> = match std::fs::read(dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        let mut map = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            match load_one(&path) {
                Ok((policy, schedule, source)) => {
                    let run = states.get(&policy.name).copied().unwrap_or(RunState {
                        applied: crate::daemon::clock::now(),
                        last_run: None,
                    });
                    map.insert(
                        policy.name.clone(),
                        Installed {
                            policy,
                            schedule,
                            source,
                            run,
                        },
                    );
                }
                Err(e) => tracing::error!("policy file {} skipped: {e}", path.display()),
            }
        }
        Ok(PolicyStore {
            dir: Some(dir.to_path_buf()),
            inner: Mutex::new(map),
        })
    }

    /// Installs (or replaces) a validated policy; returns whether it is new. A replaced
    /// policy keeps its last run, so re-applying the same file does not fire it again.
    pub fn apply(&self, policy: Policy, source: &str, now: i64) -> ApiResult<bool> {
        let schedule = Schedule::parse(&policy.schedule)
            .map_err(|e| ApiError::bad_request(format!("policy {}: {e}", policy.name)))?;
        let mut map = self.inner.lock().expect("policy lock");
        let last_run = map.get(&policy.name).and_then(|p| p.run.last_run);
        if let Some(dir) = &self.dir {
            write_atomic(
                &dir.join(format!("{}.toml", policy.name)),
                source.as_bytes(),
            )?;
        }
        let name = policy.name.clone();
        let run = RunState {
            applied: now,
            last_run,
        };
        let inst = Installed {
            policy,
            schedule,
            source: source.to_string(),
            run,
        };
        let created = map.insert(name, inst).is_none();
        self.save_state(&map)?;
        Ok(created)
    }

    /// Every policy, by name.
    pub fn list(&self) -> Vec<PolicyInfo> {
        let map = self.inner.lock().expect("policy lock");
        map.values().map(Installed::info).collect()
    }

    /// One policy.
    pub fn get(&self, name: &str) -> Option<PolicyInfo> {
        let map = self.inner.lock().expect("policy lock");
        map.get(name).map(Installed::info)
    }

    /// Removes policy `name`.
    pub fn delete(&self, name: &str) -> ApiResult<()> {
        let mut map = self.inner.lock().expect("policy lock");
        if map.remove(name).is_none() {
            return Err(ApiError::not_found(format!("policy {name} does not exist")));
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name}.toml"));
            std::fs::remove_file(&path)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", path.display())))?;
        }
        self.save_state(&map)
    }

    /// The enabled policies due at `now`, each marked as run at `now` (and persisted).
    pub fn take_due(&self, now: i64) -> Vec<Policy> {
        let mut map = self.inner.lock().expect("policy lock");
        let mut due = Vec::new();
        for p in map.values_mut() {
            let since = p.run.last_run.unwrap_or(p.run.applied);
            if p.policy.enabled && is_due(&p.schedule, since, now) {
                p.run.last_run = Some(now);
                due.push(p.policy.clone());
            }
        }
        if !due.is_empty() {
            if let Err(e) = self.save_state(&map) {
                tracing::error!("saving policy run times: {e}");
            }
        }
        due
    }

    fn save_state(&self, map: &BTreeMap<String, Installed>) -> ApiResult<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let states: BTreeMap<&str, RunState> =
            map.iter().map(|(k, v)| (k.as_str(), v.run)).collect();
        let body =
            serde_json::to_vec_pretty(&states).map_err(|e| ApiError::internal(e.to_string()))?;
        write_atomic(&dir.join("state.json"), &body)
    }
}

fn load_one(path: &Path) -> anyhow::Result<(Policy, Schedule, String)> {
    let source = std::fs::read_to_string(path)?;
    let policy = parse(&source).map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    anyhow::ensure!(
        stem == policy.name,
        "its name is {:?}, not {stem:?}",
        policy.name
    );
    let schedule = Schedule::parse(&policy.schedule).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((policy, schedule, source))
}

/// Writes `body` to a temporary name, syncs, renames over `path`.
fn write_atomic(path: &Path, body: &[u8]) -> ApiResult<()> {
    let err = |e: std::io::Error| ApiError::internal(format!("writing {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(body).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::policy::tests::GOOD;

    #[test]
    fn the_store_persists_sources_and_run_times() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open(dir.path()).unwrap();
        assert!(store.apply(parse(GOOD).unwrap(), GOOD, 1_000).unwrap());
        assert!(store.take_due(1_000 + 86_400 * 2).len() == 1);
        drop(store);
        let again = PolicyStore::open(dir.path()).unwrap();
        let info = again.get("web").unwrap();
        assert_eq!(info.source, GOOD);
        assert_eq!(info.last_run, Some(1_000 + 86_400 * 2));
        again.delete("web").unwrap();
        assert!(PolicyStore::open(dir.path()).unwrap().list().is_empty());
    }
}
