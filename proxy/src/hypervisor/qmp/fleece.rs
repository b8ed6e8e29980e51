//! Pull-mode backup over QMP, as libvirt does it: a qcow2 scratch node backed by each disk, one
//! `transaction` (new checkpoint bitmap, a disabled temporary bitmap merged from the base
//! checkpoint, `blockdev-backup` with `sync: none` into the scratch node), then an NBD server
//! on a unix socket exporting each scratch node with its bitmap. Torn down in reverse, every
//! step attempted even when an earlier one failed.
//!
//! A proxy killed mid-backup leaves all of it in QEMU (exports, NBD server, block jobs,
//! scratch nodes, temporary bitmaps), which would refuse the next backup (the scratch node's
//! name is taken). [`end_stale`] finds it by name and by its scratch image's path, and tears it
//! down the same way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::client::QmpClient;
use crate::hypervisor::{image, BackupRequest, DiskExport, DiskInfo, Error, ErrorKind, Result};

/// Prefix of every node, job, bitmap and export this module creates.
pub(super) const PREFIX: &str = "sluice-";
/// How long QEMU may take to drop an export or a cancelled job.
const SETTLE: Duration = Duration::from_secs(30);

/// One disk's fleecing state, as far as it got.
struct FleeceDisk {
    disk: String,
    scratch_node: String,
    scratch_path: PathBuf,
    job: String,
    temp_bitmap: Option<String>,
    /// Carries the checkpoints' bitmaps (a disk read in full every time does not).
    tracked: bool,
    node_added: bool,
    export_id: Option<String>,
}

/// Everything a QMP pull-mode backup created, for teardown.
pub(super) struct Fleece {
    disks: Vec<FleeceDisk>,
    transaction_done: bool,
    nbd_server: bool,
    new_checkpoint: Option<String>,
}

fn names(req: &BackupRequest, disk: &str) -> FleeceDisk {
    let tracked = !req.full_disks.iter().any(|d| d == disk);
    FleeceDisk {
        disk: disk.to_string(),
        scratch_node: format!("{PREFIX}scratch-{disk}"),
        scratch_path: req
            .scratch_dir
            .clone()
            .unwrap_or_default()
            .join(format!("{}.{disk}.scratch.qcow2", req.vm)),
        job: format!("{PREFIX}backup-{disk}"),
        temp_bitmap: req
            .incremental_from
            .as_ref()
            .filter(|_| tracked)
            .map(|_| format!("{PREFIX}backup-{disk}")),
        tracked,
        node_added: false,
        export_id: None,
    }
}

/// Sets the backup up; on failure undoes what was done and returns the error.
pub(super) async fn setup(
    c: &mut QmpClient,
    req: &BackupRequest,
    disks: &[DiskInfo],
) -> Result<(Fleece, Vec<DiskExport>)> {
    let mut f = Fleece {
        disks: req.disks.iter().map(|d| names(req, d)).collect(),
        transaction_done: false,
        nbd_server: false,
        new_checkpoint: req.new_checkpoint.clone(),
    };
    match f.build(c, req, disks).await {
        Ok(exports) => Ok((f, exports)),
        Err(e) => {
            if let Err(t) = f.teardown(c, false).await {
                tracing::error!(vm = %req.vm, error = %catalog::Chain(&t), "teardown after a failed qmp backup start failed");
            }
            Err(e)
        }
    }
}

impl Fleece {
    async fn build(
        &mut self,
        c: &mut QmpClient,
        req: &BackupRequest,
        disks: &[DiskInfo],
    ) -> Result<Vec<DiskExport>> {
        let capacity = |d: &str| {
            disks
                .iter()
                .find(|x| x.target == d)
                .map_or(0, |x| x.capacity)
        };
        for fd in &mut self.disks {
            image::create_scratch(&fd.scratch_path, capacity(&fd.disk)).await?;
            let file = json!({"driver": "file", "filename": fd.scratch_path});
            let args = json!({"driver": "qcow2", "node-name": fd.scratch_node, "file": file, "backing": fd.disk});
            c.execute_value("blockdev-add", args).await?;
            fd.node_added = true;
        }
        c.execute_value("transaction", json!({"actions": self.actions(req)}))
            .await?;
        self.transaction_done = true;
        let addr = json!({"type": "unix", "data": {"path": req.socket}});
        c.execute_value("nbd-server-start", json!({"addr": addr}))
            .await?;
        self.nbd_server = true;
        let mut exports = Vec::new();
        for fd in &mut self.disks {
            let id = format!("{PREFIX}export-{}", fd.disk);
            let bitmaps: Vec<&String> = fd.temp_bitmap.iter().collect();
            let args = json!({"type": "nbd", "id": id, "node-name": fd.scratch_node, "name": fd.disk,
                              "writable": false, "bitmaps": bitmaps});
            c.execute_value("block-export-add", args).await?;
            fd.export_id = Some(id);
            exports.push(DiskExport {
                disk: fd.disk.clone(),
                socket: req.socket.clone(),
                tcp_port: None,
                export_name: fd.disk.clone(),
                dirty_bitmap_context: fd
                    .temp_bitmap
                    .as_ref()
                    .map(|b| format!("qemu:dirty-bitmap:{b}")),
                capacity: capacity(&fd.disk),
            });
        }
        Ok(exports)
    }

    /// The one atomic transaction that fixes the point in time for every disk.
    fn actions(&self, req: &BackupRequest) -> Vec<Value> {
        let mut actions = Vec::new();
        for fd in &self.disks {
            let node = &fd.disk;
            if let Some(cp) = req.new_checkpoint.as_ref().filter(|_| fd.tracked) {
                let data = json!({"node": node, "name": cp, "persistent": true});
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": data}));
            }
            if let (Some(tmp), Some(base)) = (&fd.temp_bitmap, &req.incremental_from) {
                let add = json!({"node": node, "name": tmp, "persistent": false, "disabled": true});
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": add}));
                let merge = json!({"node": node, "target": tmp, "bitmaps": [base]});
                actions.push(json!({"type": "block-dirty-bitmap-merge", "data": merge}));
            }
            let backup = json!({"job-id": fd.job, "device": node, "target": fd.scratch_node, "sync": "none"});
            actions.push(json!({"type": "blockdev-backup", "data": backup}));
        }
        actions
    }

    /// Tears down in reverse; `success` keeps the new checkpoint's bitmaps.
    pub(super) async fn teardown(&mut self, c: &mut QmpClient, success: bool) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!(error = %catalog::Chain(&e), "qmp backup teardown step failed");
                first.get_or_insert(e);
            }
        };
        for fd in &mut self.disks {
            if let Some(id) = fd.export_id.take() {
                note(del_export(c, &id).await);
            }
        }
        if std::mem::take(&mut self.nbd_server) {
            note(
                c.execute_value("nbd-server-stop", json!({}))
                    .await
                    .map(drop),
            );
        }
        if std::mem::take(&mut self.transaction_done) {
            for fd in &self.disks {
                note(cancel_job(c, &fd.job).await);
                if let Some(tmp) = &fd.temp_bitmap {
                    note(remove_bitmap(c, &fd.disk, tmp).await);
                }
                if let (false, Some(cp), true) = (success, &self.new_checkpoint, fd.tracked) {
                    note(remove_bitmap(c, &fd.disk, cp).await);
                }
            }
        }
        for fd in &mut self.disks {
            if std::mem::take(&mut fd.node_added) {
                note(del_node(c, &fd.scratch_node).await);
            }
            if let Err(e) = std::fs::remove_file(&fd.scratch_path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    note(Err(crate::hypervisor::io_failed(
                        format!("removing {}", fd.scratch_path.display()),
                        e,
                    )));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// A block node as `query-named-block-nodes` names it, with its bitmaps' names.
#[derive(Deserialize)]
struct NodeFile {
    #[serde(rename = "node-name")]
    node_name: String,
    file: String,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<BitmapName>,
}

/// A bitmap's name; a block job's own bitmaps have none.
#[derive(Deserialize)]
struct BitmapName {
    #[serde(default)]
    name: String,
}

/// The scratch image behind a stale scratch node's `file` (a plain path, or a `json:{…}`
/// description that holds it as a `filename`).
fn scratch_image(file: &str) -> PathBuf {
    fn find(v: &Value) -> Option<&str> {
        v.get("filename")
            .and_then(Value::as_str)
            .or_else(|| v.get("file").and_then(find))
    }
    let described = file
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<Value>(j).ok());
    PathBuf::from(described.as_ref().and_then(find).unwrap_or(file))
}

/// Tears down the backup a killed proxy left in QEMU. Its scratch nodes are the
/// `sluice-scratch-DISK` nodes whose image path contains `marker` (a Sluice job directory);
/// for each disk its export, block job, temporary bitmap, scratch node and image go, in the
/// order [`Fleece::teardown`] uses, and the NBD server if it served them (QEMU runs one). The
/// new checkpoint's bitmap stays, as under libvirt: the next successful backup drops it.
/// Returns the first disk's scratch image (in the job directory, beside the NBD socket);
/// `None` when nothing matched.
pub(super) async fn end_stale(c: &mut QmpClient, marker: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{PREFIX}scratch-");
    let nodes: Vec<NodeFile> = c
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let stale: Vec<(String, PathBuf)> = nodes
        .iter()
        .filter(|n| n.file.contains(marker))
        .filter_map(|n| {
            let disk = n.node_name.strip_prefix(&prefix)?;
            Some((disk.to_string(), scratch_image(&n.file)))
        })
        .collect();
    let Some(image) = stale.first().map(|(_, p)| p.clone()) else {
        return Ok(None);
    };
    let exports: Vec<Named> = c.execute("query-block-exports", json!({})).await?;
    let jobs: Vec<Job> = c.execute("query-block-jobs", json!({})).await?;
    let mut results = Vec::new();
    let mut exported = false;
    for (disk, _) in &stale {
        let id = format!("{PREFIX}export-{disk}");
        if exports.iter().any(|e| e.id == id) {
            exported = true;
            results.push(del_export(c, &id).await);
        }
    }
    if exported {
        let stop = c.execute_value("nbd-server-stop", json!({})).await;
        results.push(stop.map(drop));
    }
    for (disk, path) in &stale {
        let job = format!("{PREFIX}backup-{disk}");
        if jobs.iter().any(|j| j.device == job) {
            results.push(cancel_job(c, &job).await);
        }
        let has_temp = nodes
            .iter()
            .any(|n| &n.node_name == disk && n.dirty_bitmaps.iter().any(|b| b.name == job));
        if has_temp {
            results.push(remove_bitmap(c, disk, &job).await);
        }
        results.push(del_node(c, &format!("{prefix}{disk}")).await);
        let _ = std::fs::remove_file(path);
    }
    tracing::warn!(scratch = %image.display(), "ended a qmp backup left by an earlier run");
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(Some(image))
}

#[derive(Deserialize)]
struct Named {
    id: String,
}

#[derive(Deserialize)]
struct Job {
    device: String,
}

async fn del_export(c: &mut QmpClient, id: &str) -> Result<()> {
    c.execute_value("block-export-del", json!({"id": id, "mode": "hard"}))
        .await?;
    let start = Instant::now();
    loop {
        let exports: Vec<Named> = c.execute("query-block-exports", json!({})).await?;
        if !exports.iter().any(|e| e.id == id) {
            return Ok(());
        }
        settle_or_fail(start, || format!("export {id}")).await?;
    }
}

async fn cancel_job(c: &mut QmpClient, job: &str) -> Result<()> {
    c.execute_value("block-job-cancel", json!({"device": job, "force": true}))
        .await?;
    let start = Instant::now();
    loop {
        let jobs: Vec<Job> = c.execute("query-block-jobs", json!({})).await?;
        if !jobs.iter().any(|j| j.device == job) {
            return Ok(());
        }
        settle_or_fail(start, || format!("block job {job}")).await?;
    }
}

/// Sleeps a little, or fails once QEMU has had [`SETTLE`] to let go of something.
async fn settle_or_fail(start: Instant, what: impl FnOnce() -> String) -> Result<()> {
    if start.elapsed() > SETTLE {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("{} did not go away", what()),
        ));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

async fn remove_bitmap(c: &mut QmpClient, node: &str, name: &str) -> Result<()> {
    c.execute_value(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": name}),
    )
    .await
    .map(drop)
}

/// `blockdev-del` of the scratch node; QEMU may still hold it for a moment after the job ends.
async fn del_node(c: &mut QmpClient, node: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        match c
            .execute_value("blockdev-del", json!({"node-name": node}))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > SETTLE => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
