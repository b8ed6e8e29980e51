//! The SQLite catalog: an index of the repository, never the truth.
//!
//! Owns the schema, its versioned migrations and every query. WAL mode, `synchronous=FULL`.
//! Everything in it can be rebuilt from the repository (`Repository::rebuild_catalog`); job
//! history is the daemon's (`jobs.jsonl`), not the catalog's.

use crate::error::{Error, ErrorKind, Result};
use crate::format::blob::BlobKind;
use crate::format::manifest::{BackupMode, Manifest};
use crate::format::pack::PackEntry;
use crate::ids::{BackupId, ChunkDigest, PackId};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// Schema migrations; index `i` takes the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // v1: repository index.
    "CREATE TABLE vms (uuid TEXT PRIMARY KEY, name TEXT NOT NULL);
     CREATE TABLE backups (id TEXT PRIMARY KEY, vm_uuid TEXT NOT NULL, started INTEGER NOT NULL,
        finished INTEGER NOT NULL, mode TEXT NOT NULL, reason TEXT, consistency TEXT NOT NULL,
        protected INTEGER NOT NULL DEFAULT 0, bytes_stored INTEGER NOT NULL,
        metadata_bytes INTEGER NOT NULL);
     CREATE INDEX backups_vm ON backups(vm_uuid, started);
     CREATE TABLE disks (backup_id TEXT NOT NULL, idx INTEGER NOT NULL, target TEXT NOT NULL,
        size INTEGER NOT NULL, chunk_size INTEGER NOT NULL, checkpoint TEXT,
        parent_backup TEXT, PRIMARY KEY (backup_id, idx));
     CREATE TABLE packs (id BLOB PRIMARY KEY, size INTEGER NOT NULL, blobs INTEGER NOT NULL)
        WITHOUT ROWID;
     CREATE TABLE chunks (digest BLOB PRIMARY KEY, pack BLOB NOT NULL, offset INTEGER NOT NULL,
        length INTEGER NOT NULL, kind INTEGER NOT NULL) WITHOUT ROWID;
     CREATE INDEX chunks_pack ON chunks(pack);",
    // v2: checkpoints and jobs.
    "CREATE TABLE checkpoints (vm_uuid TEXT NOT NULL, disk TEXT NOT NULL, name TEXT NOT NULL,
        backup_id TEXT NOT NULL, PRIMARY KEY (vm_uuid, disk, name));
     CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
        vm_uuid TEXT, state TEXT NOT NULL, started INTEGER NOT NULL, finished INTEGER,
        message TEXT);",
    // v3: neither was ever read by the product: a backup's checkpoint is in its manifest
    // (and `disks.checkpoint`), job history in the daemon's `jobs.jsonl`.
    "DROP TABLE checkpoints;
     DROP TABLE jobs;",
];

/// Current schema version.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The pack.
    pub pack: PackId,
    /// Offset of the blob in the pack.
    pub offset: u64,
    /// Blob length.
    pub length: u32,
}

/// A backup as the catalog lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRow {
    /// Backup id.
    pub id: BackupId,
    /// VM UUID.
    pub vm_uuid: String,
    /// Start, unix seconds.
    pub started: i64,
    /// Commit, unix seconds.
    pub finished: i64,
    /// `full`, `incremental` or `full_because`.
    pub mode: String,
    /// Why a full was taken instead of an incremental.
    pub reason: Option<String>,
    /// Whether retention must keep it.
    pub protected: bool,
    /// Bytes of new blobs it stored.
    pub bytes_stored: u64,
}

/// A connection to the catalog database.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
}

/// Most digests asked in one [`Catalog::known_among`] statement.
pub const KNOWN_BATCH: usize = 64;

fn e(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |err| Error::db(format!("catalog: {what}"), err)
}

/// Creates the catalog file owner-only (0600) before SQLite opens it (SQLite gives its
/// `-wal` and `-shm` files the database's mode), or takes group and other permissions off an
/// existing one.
fn owner_only_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |err| Error::io(format!("catalog {}", path.display()), err);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(io)?;
    }
    Ok(())
}

impl Catalog {
    /// Open (creating and migrating as needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        owner_only_file(path)?;
        let conn = Connection::open(path).map_err(e("open"))?;
        let c = Catalog { conn };
        c.pragmas()?;
        c.migrate(SCHEMA_VERSION)?;
        Ok(c)
    }

    /// Open and migrate only up to `version` (tests of migrations).
    pub fn open_at_version(path: &Path, version: usize) -> Result<Self> {
        let conn = Connection::open(path).map_err(e("open"))?;
        let c = Catalog { conn };
        c.pragmas()?;
        c.migrate(version)?;
        Ok(c)
    }

    fn pragmas(&self) -> Result<()> {
        self.conn
            .busy_timeout(std::time::Duration::from_secs(30))
            .map_err(e("busy timeout"))?;
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(e("wal"))?;
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(e("synchronous"))
    }

    /// The schema version stored in the database.
    pub fn version(&self) -> Result<usize> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(e("user_version"))?;
        Ok(v as usize)
    }

    fn migrate(&self, target: usize) -> Result<()> {
        let cur = self.version()?;
        if cur > SCHEMA_VERSION {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("catalog schema {cur} is newer than this build ({SCHEMA_VERSION})"),
            ));
        }
        for (v, sql) in MIGRATIONS.iter().enumerate().take(target).skip(cur) {
            let tx = self.conn.unchecked_transaction().map_err(e("migrate"))?;
            tx.execute_batch(sql).map_err(e("migrate"))?;
            tx.pragma_update(None, "user_version", (v + 1) as i64)
                .map_err(e("migrate"))?;
            tx.commit().map_err(e("migrate"))?;
            tracing::info!(version = v + 1, "catalog schema migrated");
        }
        Ok(())
    }

    /// Forgets where `digest` is stored (its stored copy failed verification): the next
    /// backup that writes the same content stores it again, and every backup that references
    /// it then reads that new copy. Returns whether it was known.
    pub fn forget_chunk(&self, digest: &ChunkDigest) -> Result<bool> {
        let n = self
            .conn
            .execute("DELETE FROM chunks WHERE digest = ?1", [&digest.0[..]])
            .map_err(e("forget chunk"))?;
        Ok(n > 0)
    }

    /// Where `digest` is stored, if known.
    pub fn lookup(&self, digest: &ChunkDigest) -> Result<Option<Location>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT pack, offset, length FROM chunks WHERE digest = ?1")
            .map_err(e("lookup"))?;
        st.query_row([&digest.0[..]], |r| {
            let p: Vec<u8> = r.get(0)?;
            Ok((p, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
        .optional()
        .map_err(e("lookup"))?
        .map(|(p, o, l)| {
            let pack = PackId(
                p.try_into()
                    .map_err(|_| Error::corrupt("catalog: pack id"))?,
            );
            Ok(Location {
                pack,
                offset: o as u64,
                length: l as u32,
            })
        })
        .transpose()
    }

    /// Which of `digests` the catalog knows, in one query (at most [`KNOWN_BATCH`] digests):
    /// one statement per batch of chunks instead of one per chunk.
    pub fn known_among(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>> {
        let mut found = vec![false; digests.len()];
        for (part, out) in digests
            .chunks(KNOWN_BATCH)
            .zip(found.chunks_mut(KNOWN_BATCH))
        {
            let marks = vec!["?"; part.len()].join(",");
            let sql = format!("SELECT digest FROM chunks WHERE digest IN ({marks})");
            let mut st = self.conn.prepare_cached(&sql).map_err(e("lookup batch"))?;
            let params = rusqlite::params_from_iter(part.iter().map(|d| &d.0[..]));
            let mut rows = st.query(params).map_err(e("lookup batch"))?;
            while let Some(r) = rows.next().map_err(e("lookup batch"))? {
                let d: Vec<u8> = r.get(0).map_err(e("lookup batch"))?;
                for (i, x) in part.iter().enumerate() {
                    out[i] |= x.0[..] == d[..];
                }
            }
        }
        Ok(found)
    }

    /// Record a sealed pack and its blobs (first location of a digest wins).
    pub fn insert_pack(&self, id: PackId, size: u64, entries: &[PackEntry]) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(e("insert pack"))?;
        tx.execute(
            "INSERT OR IGNORE INTO packs (id, size, blobs) VALUES (?1, ?2, ?3)",
            params![&id.0[..], size as i64, entries.len() as i64],
        )
        .map_err(e("insert pack"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO chunks (digest, pack, offset, length, kind)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(e("insert chunk"))?;
            for en in entries {
                st.execute(params![
                    &en.digest.0[..],
                    &id.0[..],
                    en.offset as i64,
                    en.length as i64,
                    en.kind as i64
                ])
                .map_err(e("insert chunk"))?;
            }
        }
        tx.commit().map_err(e("insert pack"))
    }

    /// Point `digest` at a new location (repack).
    pub fn relocate(&self, digest: &ChunkDigest, loc: Location, kind: BlobKind) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO chunks (digest, pack, offset, length, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    &digest.0[..],
                    &loc.pack.0[..],
                    loc.offset as i64,
                    loc.length as i64,
                    kind as i64
                ],
            )
            .map_err(e("relocate"))?;
        Ok(())
    }

    /// Forget a pack and every blob located in it.
    pub fn remove_pack(&self, id: PackId) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(e("remove pack"))?;
        tx.execute("DELETE FROM chunks WHERE pack = ?1", [&id.0[..]])
            .map_err(e("remove pack"))?;
        tx.execute("DELETE FROM packs WHERE id = ?1", [&id.0[..]])
            .map_err(e("remove pack"))?;
        tx.commit().map_err(e("remove pack"))
    }

    /// Every pack the catalog knows.
    pub fn packs(&self) -> Result<Vec<PackId>> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM packs")
            .map_err(e("packs"))?;
        let rows = st
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(e("packs"))?;
        rows.map(|r| {
            let v = r.map_err(e("packs"))?;
            Ok(PackId(
                v.try_into()
                    .map_err(|_| Error::corrupt("catalog: pack id"))?,
            ))
        })
        .collect()
    }

    /// Number of blobs the catalog locates.
    pub fn chunk_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(e("count"))
    }

    /// Record a committed backup.
    pub fn insert_backup(&self, m: &Manifest, protected: bool) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(e("insert backup"))?;
        tx.execute(
            "INSERT OR REPLACE INTO vms (uuid, name) VALUES (?1, ?2)",
            params![m.vm.uuid, m.vm.name],
        )
        .map_err(e("insert vm"))?;
        let (mode, reason) = mode_text(&m.mode);
        tx.execute(
            "INSERT OR REPLACE INTO backups (id, vm_uuid, started, finished, mode, reason,
               consistency, protected, bytes_stored, metadata_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                m.id.as_str(),
                m.vm.uuid,
                m.started,
                m.finished,
                mode,
                reason,
                format!("{:?}", m.consistency).to_lowercase(),
                protected,
                m.stats.bytes_stored as i64,
                m.stats.metadata_bytes as i64
            ],
        )
        .map_err(e("insert backup"))?;
        insert_disks(&tx, m)?;
        tx.commit().map_err(e("insert backup"))
    }

    /// Forget a backup (its disks too).
    pub fn remove_backup(&self, id: &BackupId) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(e("remove backup"))?;
        for sql in [
            "DELETE FROM disks WHERE backup_id = ?1",
            "DELETE FROM backups WHERE id = ?1",
        ] {
            tx.execute(sql, [id.as_str()]).map_err(e("remove backup"))?;
        }
        tx.commit().map_err(e("remove backup"))
    }

    /// Backups, oldest first; only `vm_uuid`'s when given.
    pub fn backups(&self, vm_uuid: Option<&str>) -> Result<Vec<BackupRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, vm_uuid, started, finished, mode, reason, protected, bytes_stored
                 FROM backups WHERE ?1 IS NULL OR vm_uuid = ?1 ORDER BY started, id",
            )
            .map_err(e("backups"))?;
        let rows = st
            .query_map([vm_uuid], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    (r.get::<_, i64>(2)?, r.get::<_, i64>(3)?),
                    (r.get::<_, String>(4)?, r.get::<_, Option<String>>(5)?),
                    r.get::<_, bool>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(e("backups"))?;
        rows.map(|r| {
            let (id, vm_uuid, (started, finished), (mode, reason), protected, bytes) =
                r.map_err(e("backups"))?;
            Ok(BackupRow {
                id: BackupId::parse(&id)?,
                vm_uuid,
                started,
                finished,
                mode,
                reason,
                protected,
                bytes_stored: bytes as u64,
            })
        })
        .collect()
    }

    /// Mark or unmark a backup as protected from retention.
    pub fn set_protected(&self, id: &BackupId, protected: bool) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE backups SET protected = ?2 WHERE id = ?1",
                params![id.as_str(), protected],
            )
            .map_err(e("protect"))?;
        if n == 0 {
            return Err(Error::not_found(format!("backup {id} not found")));
        }
        Ok(())
    }

    /// VMs known: (uuid, name).
    pub fn vms(&self) -> Result<Vec<(String, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT uuid, name FROM vms ORDER BY name")
            .map_err(e("vms"))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(e("vms"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(e("vms"))
    }

    /// Drop everything (all of it is rebuilt from the repository).
    pub fn clear_derived(&self) -> Result<()> {
        self.conn
            .execute_batch(
                "BEGIN; DELETE FROM chunks; DELETE FROM packs; DELETE FROM disks;
                 DELETE FROM backups; DELETE FROM vms; COMMIT;",
            )
            .map_err(e("clear"))
    }

    /// Raw connection for tests of migrations.
    #[doc(hidden)]
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

fn mode_text(m: &BackupMode) -> (&'static str, Option<&str>) {
    match m {
        BackupMode::Full => ("full", None),
        BackupMode::Incremental => ("incremental", None),
        BackupMode::FullBecause(r) => ("full_because", Some(r.as_str())),
    }
}

fn insert_disks(tx: &rusqlite::Transaction<'_>, m: &Manifest) -> Result<()> {
    for (i, d) in m.disks.iter().enumerate() {
        tx.execute(
            "INSERT OR REPLACE INTO disks (backup_id, idx, target, size, chunk_size, checkpoint,
               parent_backup) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                m.id.as_str(),
                i as i64,
                d.target,
                d.size as i64,
                d.chunk_size as i64,
                d.checkpoint,
                d.parent_backup.as_ref().map(|p| p.as_str())
            ],
        )
        .map_err(e("insert disk"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_among_batches_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let all: Vec<ChunkDigest> = (0..150u32)
            .map(|i| ChunkDigest::of(&i.to_le_bytes()))
            .collect();
        let stored: Vec<PackEntry> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 0)
            .map(|(i, d)| PackEntry {
                digest: *d,
                offset: i as u64,
                length: 1,
                kind: BlobKind::Chunk,
            })
            .collect();
        cat.insert_pack(PackId([7; 32]), 1, &stored).unwrap();
        let found = cat.known_among(&all).unwrap();
        let expect: Vec<bool> = (0..150).map(|i| i % 3 == 0).collect();
        assert_eq!(found, expect);
        assert!(cat.known_among(&[]).unwrap().is_empty());
    }
}
