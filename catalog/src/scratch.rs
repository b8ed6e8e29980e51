//! Scratch sets for whole-repository walks (verify, GC), kept on disk instead of in RAM.
//!
//! Owns a private connection to the catalog with a temporary SQLite database attached as
//! `scratch`: the index blocks a walk has visited and the chunk digests verify must check,
//! and the queries that join them with the catalog's chunk locations. SQLite creates the
//! temporary file under `SQLITE_TMPDIR`, `TMPDIR` or `/var/tmp` and unlinks it at once, so
//! nothing outlives the walk, even after `kill -9`. Its page cache is capped
//! ([`CACHE_KIB`]), so memory does not grow with the repository; the file does (about
//! 40 bytes per distinct chunk). Being its own connection, a long walk never holds the
//! shared catalog connection that running backups need.

use crate::db::Location;
use crate::error::{Error, Result};
use crate::ids::{ChunkDigest, PackId};
use rusqlite::Connection;
use std::path::Path;

/// Page cache of each attached database, KiB.
pub(crate) const CACHE_KIB: i64 = 16 << 10;

fn e(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |err| Error::db(format!("scratch: {what}"), err)
}

/// The scratch space of one walk.
pub(crate) struct Scratch {
    conn: Connection,
}

impl Scratch {
    /// Open a connection on the catalog at `catalog` and attach an empty scratch database.
    pub(crate) fn open(catalog: &Path) -> Result<Self> {
        let conn = Connection::open(catalog).map_err(e("open catalog"))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(e("busy timeout"))?;
        conn.execute_batch(&format!(
            "PRAGMA temp_store = FILE;
             PRAGMA main.cache_size = -{CACHE_KIB};
             ATTACH DATABASE '' AS scratch;
             PRAGMA scratch.cache_size = -{CACHE_KIB};
             PRAGMA scratch.journal_mode = OFF;
             PRAGMA scratch.synchronous = OFF;
             CREATE TABLE scratch.blocks (digest BLOB PRIMARY KEY) WITHOUT ROWID;
             CREATE TABLE scratch.needed (digest BLOB PRIMARY KEY) WITHOUT ROWID;"
        ))
        .map_err(e("attach"))?;
        Ok(Scratch { conn })
    }

    /// Record index block `id`; true if this walk had not visited it yet.
    pub(crate) fn first_visit(&self, id: &ChunkDigest) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO scratch.blocks (digest) VALUES (?1)")
            .map_err(e("visit"))?;
        Ok(st.execute([&id.0[..]]).map_err(e("visit"))? == 1)
    }

    /// Record chunks a backup needs (the zero id is skipped).
    pub(crate) fn add_needed(&self, ids: &[ChunkDigest]) -> Result<()> {
        let tx = self.conn.unchecked_transaction().map_err(e("needed"))?;
        {
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO scratch.needed (digest) VALUES (?1)")
                .map_err(e("needed"))?;
            for d in ids.iter().filter(|d| !d.is_zero()) {
                st.execute([&d.0[..]]).map_err(e("needed"))?;
            }
        }
        tx.commit().map_err(e("needed"))
    }

    /// Distinct chunks recorded as needed.
    pub(crate) fn needed_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM scratch.needed", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(e("count"))
    }

    /// Each needed chunk the catalog does not locate.
    pub(crate) fn for_each_unlocated(
        &self,
        mut f: impl FnMut(ChunkDigest) -> Result<()>,
    ) -> Result<()> {
        let mut st = self
            .conn
            .prepare(
                "SELECT n.digest FROM scratch.needed n
                 WHERE NOT EXISTS (SELECT 1 FROM main.chunks c WHERE c.digest = n.digest)",
            )
            .map_err(e("unlocated"))?;
        let mut rows = st.query([]).map_err(e("unlocated"))?;
        while let Some(r) = rows.next().map_err(e("unlocated"))? {
            f(digest(r.get(0).map_err(e("unlocated"))?)?)?;
        }
        Ok(())
    }

    /// Each needed chunk with its location, one pack at a time (a pack's chunks in offset
    /// order). Walks the catalog's `chunks_pack` index, so no sort of the whole set is
    /// needed; memory holds one pack's entries.
    pub(crate) fn for_each_pack(
        &self,
        mut f: impl FnMut(PackId, Vec<(ChunkDigest, Location)>) -> Result<()>,
    ) -> Result<()> {
        let mut st = self
            .conn
            .prepare(
                "SELECT c.pack, c.offset, c.length, c.digest FROM main.chunks c
                 INDEXED BY chunks_pack
                 WHERE EXISTS (SELECT 1 FROM scratch.needed n WHERE n.digest = c.digest)
                 ORDER BY c.pack",
            )
            .map_err(e("by pack"))?;
        let mut rows = st.query([]).map_err(e("by pack"))?;
        let mut cur: Option<PackId> = None;
        let mut group = Vec::new();
        while let Some(r) = rows.next().map_err(e("by pack"))? {
            let pack = pack_id(r.get(0).map_err(e("by pack"))?)?;
            let loc = Location {
                pack,
                offset: r.get::<_, i64>(1).map_err(e("by pack"))? as u64,
                length: r.get::<_, i64>(2).map_err(e("by pack"))? as u32,
            };
            let d = digest(r.get(3).map_err(e("by pack"))?)?;
            if cur.is_some_and(|c| c != pack) {
                flush(&mut cur, &mut group, &mut f)?;
            }
            cur = Some(pack);
            group.push((d, loc));
        }
        flush(&mut cur, &mut group, &mut f)
    }
}

fn flush(
    cur: &mut Option<PackId>,
    group: &mut Vec<(ChunkDigest, Location)>,
    f: &mut impl FnMut(PackId, Vec<(ChunkDigest, Location)>) -> Result<()>,
) -> Result<()> {
    if let Some(p) = cur.take() {
        let mut g = std::mem::take(group);
        g.sort_by_key(|(_, l)| l.offset);
        f(p, g)?;
    }
    Ok(())
}

fn digest(v: Vec<u8>) -> Result<ChunkDigest> {
    Ok(ChunkDigest(
        v.try_into()
            .map_err(|_| Error::corrupt("catalog: chunk digest"))?,
    ))
}

fn pack_id(v: Vec<u8>) -> Result<PackId> {
    Ok(PackId(
        v.try_into()
            .map_err(|_| Error::corrupt("catalog: pack id"))?,
    ))
}
