//! API tokens: creation (shown once), storage as argon2 hashes in `<data>/tokens.json`
//! (mode 0600), lookup of a bearer token, roles and VM scopes, and what each may do.
//!
//! A token reads `sluice_<id>_<secret>`: the id finds the record, the secret is checked
//! against its argon2 hash (salted with random bytes of its own, not drawn from the secret).
//! Verified tokens are remembered in memory by their SHA-256 so each request does not pay
//! for argon2; revoking a token forgets it. Wrong secrets cost memory and time (argon2 takes
//! about 19 MiB): at most [`MAX_SLOW_CHECKS`] run at once (more are answered 503 at once),
//! and a wrong token seen lately is refused without another check.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::daemon::clock::now;
use crate::daemon::error::{ApiError, ApiResult};
use crate::wire::tokens::Role;
use crate::wire::tokens::TokenInfo;

/// What a request asks to do; [`Caller::allow`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read state: VMs, backups, jobs, stats.
    Read,
    /// Start a backup of a VM.
    Backup,
    /// Read one job's status (scoped tokens may, for their own VMs).
    ReadJob,
    /// Cancel a job.
    Cancel,
    /// Open or close NBD exports of backups.
    Export,
    /// Restore a backup to a file or as a new domain.
    Restore,
    /// Verify the repository.
    Verify,
    /// Delete or protect backups, prune, gc.
    Modify,
    /// Create, list, revoke tokens.
    Tokens,
}

/// A stored token (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    name: String,
    role: Role,
    #[serde(default)]
    vms: Vec<String>,
    created: i64,
    hash: String,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
    pub vms: Vec<String>,
}

impl Caller {
    /// Whether the caller may do `action` (on `vm`, for VM-bound actions).
    pub fn allow(&self, action: Action, vm: Option<&str>) -> ApiResult<()> {
        let ok = match self.role {
            Role::Admin => true,
            Role::Operator => !matches!(action, Action::Modify | Action::Tokens),
            Role::Auditor => matches!(action, Action::Read | Action::ReadJob),
            Role::Scoped => {
                matches!(action, Action::Backup | Action::ReadJob)
                    && vm.is_some_and(|v| self.in_scope(v))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "token {} ({:?}) may not do this{}",
                self.token_id,
                self.role,
                vm.map(|v| format!(" on vm {v}")).unwrap_or_default()
            )))
        }
    }

    fn in_scope(&self, vm: &str) -> bool {
        self.vms.iter().any(|g| glob_match(g, vm))
    }
}

/// `*` matches any run, `?` one character; everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Argon2 checks of token secrets running at once, at most.
pub const MAX_SLOW_CHECKS: usize = 2;
/// Wrong tokens remembered (by SHA-256), at most; the oldest half is forgotten beyond.
const MAX_REMEMBERED_WRONG: usize = 4096;

/// Wrong tokens seen lately (SHA-256), and the order they were seen in.
#[derive(Debug, Default)]
struct WrongTokens {
    seen: std::collections::HashSet<[u8; 32]>,
    order: std::collections::VecDeque<[u8; 32]>,
}

/// The token file and the caches of verified and of wrong tokens.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    records: Mutex<Vec<TokenRecord>>,
    verified: Mutex<HashMap<[u8; 32], String>>,
    /// Wrong tokens seen lately, in the order seen.
    wrong: Mutex<WrongTokens>,
    /// Argon2 checks running now.
    slow_running: AtomicUsize,
    /// Argon2 checks run since the store opened.
    pub slow_checks: AtomicU64,
}

impl TokenStore {
    /// Opens `<dir>/tokens.json` (an empty store if it does not exist).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("tokens.json");
        let records = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(anyhow::anyhow!("token file {}: {e}", path.display())),
        };
        Ok(TokenStore {
            path,
            records: Mutex::new(records),
            verified: Mutex::new(HashMap::new()),
            wrong: Mutex::new(Default::default()),
            slow_running: AtomicUsize::new(0),
            slow_checks: AtomicU64::new(0),
        })
    }

    /// Whether no token exists yet.
    pub fn is_empty(&self) -> bool {
        self.records.lock().expect("token lock").is_empty()
    }

    /// Creates a token; returns its info and the secret (shown once).
    pub fn create(
        &self,
        name: &str,
        role: Role,
        vms: Vec<String>,
    ) -> ApiResult<(TokenInfo, String)> {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let mut idb = [0u8; 6];
        rand::rng().fill_bytes(&mut idb);
        let id = hex::encode(idb);
        let secret = format!("sluice_{id}_{}", hex::encode(raw));
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| ApiError::internal(e.to_string()))?;
        let hash = Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map_err(|e| ApiError::internal(format!("hashing token {id}: {e}")))?
            .to_string();
        let rec = TokenRecord {
            id,
            name: name.to_string(),
            role,
            vms,
            created: now(),
            hash,
        };
        let info = info_of(&rec);
        let mut recs = self.records.lock().expect("token lock");
        recs.push(rec);
        self.save(&recs)?;
        Ok((info, secret))
    }

    /// Every token.
    pub fn list(&self) -> Vec<TokenInfo> {
        self.records
            .lock()
            .expect("token lock")
            .iter()
            .map(info_of)
            .collect()
    }

    /// Removes token `id`.
    pub fn revoke(&self, id: &str) -> ApiResult<()> {
        let mut recs = self.records.lock().expect("token lock");
        let before = recs.len();
        recs.retain(|r| r.id != id);
        if recs.len() == before {
            return Err(ApiError::not_found(format!("token {id} does not exist")));
        }
        self.save(&recs)?;
        self.verified
            .lock()
            .expect("token lock")
            .retain(|_, v| v != id);
        Ok(())
    }

    /// The caller a bearer token stands for.
    pub fn authenticate(&self, token: &str) -> ApiResult<Caller> {
        let bad = || ApiError::unauthorized("the bearer token is not valid");
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.verified.lock().expect("token lock").get(&key).cloned();
        let id = match cached {
            Some(id) => id,
            None => {
                if self.wrong.lock().expect("token lock").seen.contains(&key) {
                    return Err(bad());
                }
                let Some(id) = self.verify_bounded(token)? else {
                    self.remember_wrong(key);
                    return Err(bad());
                };
                self.verified
                    .lock()
                    .expect("token lock")
                    .insert(key, id.clone());
                id
            }
        };
        let recs = self.records.lock().expect("token lock");
        let r = recs.iter().find(|r| r.id == id).ok_or_else(bad)?;
        Ok(Caller {
            token_id: r.id.clone(),
            role: r.role,
            vms: r.vms.clone(),
        })
    }

    /// [`TokenStore::verify_slow`] if fewer than [`MAX_SLOW_CHECKS`] run; 503 otherwise.
    fn verify_bounded(&self, token: &str) -> ApiResult<Option<String>> {
        let running = self.slow_running.fetch_add(1, Ordering::SeqCst);
        let result = if running >= MAX_SLOW_CHECKS {
            Err(ApiError::unavailable(
                "too many token checks at once: retry in a moment",
            ))
        } else {
            self.slow_checks.fetch_add(1, Ordering::Relaxed);
            Ok(self.verify_slow(token))
        };
        self.slow_running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn remember_wrong(&self, key: [u8; 32]) {
        let mut w = self.wrong.lock().expect("token lock");
        if w.seen.insert(key) {
            w.order.push_back(key);
        }
        if w.order.len() > MAX_REMEMBERED_WRONG {
            for _ in 0..MAX_REMEMBERED_WRONG / 2 {
                if let Some(old) = w.order.pop_front() {
                    w.seen.remove(&old);
                }
            }
        }
    }

    fn verify_slow(&self, token: &str) -> Option<String> {
        let mut parts = token.splitn(3, '_');
        let (prefix, id) = (parts.next()?, parts.next()?);
        if prefix != "sluice" || token.len() > 200 {
            return None;
        }
        let hash = {
            let recs = self.records.lock().expect("token lock");
            recs.iter().find(|r| r.id == id)?.hash.clone()
        };
        let parsed = PasswordHash::new(&hash).ok()?;
        Argon2::default()
            .verify_password(token.as_bytes(), &parsed)
            .ok()
            .map(|_| id.to_string())
    }

    fn save(&self, recs: &[TokenRecord]) -> ApiResult<()> {
        let err =
            |e: std::io::Error| ApiError::internal(format!("writing {}: {e}", self.path.display()));
        let tmp = self.path.with_extension("json.tmp");
        let body =
            serde_json::to_vec_pretty(recs).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        // The rename is durable only once the directory is.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

fn info_of(r: &TokenRecord) -> TokenInfo {
    TokenInfo {
        id: r.id.clone(),
        name: r.name.clone(),
        role: r.role,
        vms: r.vms.clone(),
        created: r.created,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_salt_is_not_drawn_from_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let (info, secret) = store.create("a", Role::Admin, Vec::new()).unwrap();
        let raw = hex::decode(secret.rsplit('_').next().unwrap()).unwrap();
        let hash = store.records.lock().unwrap()[0].hash.clone();
        let parsed = PasswordHash::new(&hash).unwrap();
        let from_secret = SaltString::encode_b64(&raw[..16]).unwrap();
        assert_ne!(parsed.salt.unwrap().as_str(), from_secret.as_str());
        assert_eq!(store.authenticate(&secret).unwrap().token_id, info.id);
    }

    #[test]
    fn a_wrong_token_seen_before_costs_no_second_argon2_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let (info, _) = store.create("a", Role::Admin, Vec::new()).unwrap();
        let wrong = format!("sluice_{}_{}", info.id, "00".repeat(32));
        for _ in 0..5 {
            let e = store.authenticate(&wrong).unwrap_err();
            assert_eq!(e.status, crate::daemon::error::Status::Unauthorized);
        }
        assert_eq!(store.slow_checks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn at_most_two_argon2_checks_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(TokenStore::open(dir.path()).unwrap());
        let (info, _) = store.create("a", Role::Admin, Vec::new()).unwrap();
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (store, start, id) = (store.clone(), start.clone(), info.id.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let wrong = format!("sluice_{id}_{i:064x}");
                    store.authenticate(&wrong).unwrap_err().status
                })
            })
            .collect();
        let statuses: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        use crate::daemon::error::Status;
        assert!(statuses
            .iter()
            .all(|s| matches!(s, Status::Unauthorized | Status::Unavailable)));
        assert!(
            statuses.contains(&Status::Unavailable),
            "eight wrong secrets at once: some are turned away, {statuses:?}"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("web-*", "db-1"));
        assert!(!glob_match("abc", "abcd"));
        assert!(glob_match("*-db-*", "prod-db-7"));
    }
}
