//! The plain-QEMU adapter: one QEMU process (`qemu-system-*` or `qemu-storage-daemon`) reached
//! through its QMP socket. Disks are block nodes (their node name is the disk's name); a
//! checkpoint is a persistent dirty bitmap of that name on each disk (there is no checkpoint
//! metadata beside the bitmaps). Pull-mode backups are built in [`fleece`].
//!
//! There is no guest-agent channel here: `agent_responds` is false and `freeze` refuses, so
//! backups through this adapter are crash-consistent.

mod client;
mod fleece;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

pub use client::QmpClient;

use super::session::{BoxFuture, Release};
use super::xml::validate_name;
use super::{
    BackupRequest, BackupSession, CheckpointDisk, CheckpointHealth, CheckpointInfo,
    CheckpointProblem, DiskInfo, DiskKind, DomainInfo, Error, ErrorKind, ExpectedDisk, FreezeGuard,
    Hypervisor, Result, VmState,
};

/// A dirty bitmap as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QmpBitmap {
    /// Empty for a block job's own bitmaps (a running backup job has one): those are left out.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub inconsistent: bool,
    pub granularity: u64,
}

#[derive(Deserialize)]
struct NodeImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

#[derive(Deserialize)]
struct NamedNode {
    #[serde(rename = "node-name")]
    node_name: String,
    drv: String,
    file: String,
    image: NodeImage,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<QmpBitmap>,
}

#[derive(Deserialize)]
struct BlockDevice {
    inserted: Option<Inserted>,
}

#[derive(Deserialize)]
struct Inserted {
    #[serde(rename = "node-name")]
    node_name: String,
}

#[derive(Deserialize)]
struct Status {
    status: String,
}

#[derive(Deserialize)]
struct Uuid {
    #[serde(rename = "UUID")]
    uuid: String,
}

/// A disk with its bitmaps.
struct Node {
    info: DiskInfo,
    bitmaps: Vec<QmpBitmap>,
}

/// Whether `n` is a named format node that is not ours (nor a protocol node or filter).
fn is_image_node(n: &NamedNode) -> bool {
    !matches!(n.drv.as_str(), "file" | "host_device" | "copy-before-write")
        && !n.node_name.starts_with('#')
        && !n.node_name.starts_with(fleece::PREFIX)
}

/// Disks are the nodes attached to guest devices; with no device (qemu-storage-daemon) they
/// are the named format nodes that are not ours. While a backup job runs (ours, or one a
/// killed proxy left), a device's top node is the job's copy-before-write filter: the disk is
/// the image node below it (the filter reports that node's image as its file).
async fn nodes(c: &mut QmpClient) -> Result<Vec<Node>> {
    let all: Vec<NamedNode> = c
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let devices: Vec<BlockDevice> = c.execute("query-block", json!({})).await?;
    let below_filter = |top: String| {
        let filter = all
            .iter()
            .find(|n| n.node_name == top && n.drv == "copy-before-write");
        let below = filter.and_then(|f| all.iter().find(|n| n.file == f.file && is_image_node(n)));
        below.map_or(top, |n| n.node_name.clone())
    };
    let attached: Vec<String> = devices
        .into_iter()
        .filter_map(|d| Some(below_filter(d.inserted?.node_name)))
        .collect();
    let is_disk = |n: &NamedNode| {
        if attached.is_empty() {
            is_image_node(n)
        } else {
            attached.contains(&n.node_name)
        }
    };
    let disks = all
        .into_iter()
        .filter(is_disk)
        .map(|n| Node {
            info: DiskInfo {
                target: n.node_name,
                source: Some(PathBuf::from(n.file)),
                format: Some(n.drv),
                kind: DiskKind::File,
                capacity: n.image.virtual_size,
            },
            bitmaps: n
                .dirty_bitmaps
                .into_iter()
                .filter(|b| !b.name.is_empty())
                .collect(),
        })
        .collect();
    Ok(disks)
}

/// One QEMU process over QMP.
#[derive(Clone)]
pub struct QmpHypervisor {
    vm: String,
    client: Arc<Mutex<QmpClient>>,
}

impl std::fmt::Debug for QmpHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpHypervisor")
            .field("vm", &self.vm)
            .finish()
    }
}

impl QmpHypervisor {
    /// Connects to the QMP socket of the QEMU that runs `vm` (the name we report it under).
    pub async fn connect(socket: &Path, vm: &str) -> Result<Self> {
        let client = QmpClient::connect(socket).await?;
        Ok(Self {
            vm: vm.to_string(),
            client: Arc::new(Mutex::new(client)),
        })
    }

    fn check_vm(&self, vm: &str) -> Result<()> {
        if vm == self.vm {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!("qmp socket of vm {} does not serve vm {vm}", self.vm),
            ))
        }
    }

    /// The bitmaps of every disk.
    pub async fn bitmaps(&self) -> Result<BTreeMap<String, Vec<QmpBitmap>>> {
        let mut c = self.client.lock().await;
        Ok(nodes(&mut c)
            .await?
            .into_iter()
            .map(|n| (n.info.target, n.bitmaps))
            .collect())
    }

    async fn describe(&self, c: &mut QmpClient) -> Result<DomainInfo> {
        let disks = nodes(c).await?.into_iter().map(|n| n.info).collect();
        // qemu-storage-daemon has neither a run state nor a UUID.
        let state = match c.execute::<Status>("query-status", json!({})).await {
            Ok(s) if s.status == "paused" => VmState::Paused,
            Ok(s) if s.status != "running" => VmState::Other,
            _ => VmState::Running,
        };
        let uuid = c
            .execute::<Uuid>("query-uuid", json!({}))
            .await
            .map(|u| u.uuid)
            .unwrap_or_default();
        Ok(DomainInfo {
            name: self.vm.clone(),
            uuid,
            state,
            disks,
        })
    }
}

/// Refuses a request the disks cannot serve, before anything is created.
fn validate(vm: &str, req: &BackupRequest, nodes: &[Node]) -> Result<()> {
    for cp in req.incremental_from.iter().chain(req.new_checkpoint.iter()) {
        validate_name("checkpoint", cp)?;
    }
    if req.disks.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("backup of vm {vm} names no disk"),
        ));
    }
    if req.scratch_dir.is_none() || req.tcp.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("backup of vm {vm}: a QMP hypervisor is local, its backups need a scratch directory of the proxy and a unix socket"),
        ));
    }
    for disk in &req.disks {
        validate_name("disk", disk)?;
        let Some(node) = nodes.iter().find(|n| &n.info.target == disk) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("vm {vm} has no disk {disk}"),
            ));
        };
        let tracked = !req.full_disks.contains(disk);
        if let Some(base) = req.incremental_from.as_ref().filter(|_| tracked) {
            if let Some(p) = bitmap_problem(node, base) {
                let msg = format!("bitmap {base} of disk {disk} of vm {vm} is unusable: {p:?}");
                return Err(Error::new(ErrorKind::Inconsistent, msg));
            }
        }
    }
    Ok(())
}

fn bitmap_problem(node: &Node, name: &str) -> Option<CheckpointProblem> {
    let disk = node.info.target.clone();
    match node.bitmaps.iter().find(|b| b.name == name) {
        None => Some(CheckpointProblem::BitmapMissing { disk }),
        Some(b) if b.inconsistent => Some(CheckpointProblem::BitmapInconsistent { disk }),
        Some(b) if !b.recording => Some(CheckpointProblem::BitmapDisabled { disk }),
        Some(_) => None,
    }
}

/// Tears a QMP backup down.
struct QmpEnd {
    client: Arc<Mutex<QmpClient>>,
    fleece: fleece::Fleece,
    vm: String,
}

impl Release for QmpEnd {
    fn release(mut self: Box<Self>, success: bool) -> BoxFuture<Result<()>> {
        Box::pin(async move {
            let mut c = self.client.lock().await;
            self.fleece.teardown(&mut c, success).await
        })
    }

    fn release_in_background(self: Box<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(vm = %self.vm, "no async runtime to tear a qmp backup down: its export and job are left in qemu");
            return;
        };
        let vm = self.vm.clone();
        let release = self.release(false);
        rt.spawn(async move {
            if let Err(e) = release.await {
                tracing::error!(vm = %vm, error = %catalog::Chain(&e), "background teardown of a qmp backup failed");
            }
        });
    }
}

impl Hypervisor for QmpHypervisor {
    /// Tears down the fleecing backup a killed proxy left in this QEMU (see
    /// [`fleece::end_stale`]). QMP cannot tell an NBD server's socket: the path returned is the
    /// stale scratch image, which lies in the same job directory as the socket.
    async fn abort_stale_backup(&self, vm: &str, marker: &str) -> Result<Option<PathBuf>> {
        self.check_vm(vm)?;
        let mut c = self.client.lock().await;
        fleece::end_stale(&mut c, marker).await
    }

    /// Plain QEMU has no definition to keep: the manifest records that it came over QMP.
    async fn domain_xml(&self, vm: &str) -> Result<String> {
        self.check_vm(vm)?;
        Ok(format!(
            "<!-- vm {vm}: plain QEMU over QMP, no libvirt definition -->"
        ))
    }

    async fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let mut c = self.client.lock().await;
        Ok(vec![self.describe(&mut c).await?])
    }

    async fn domain(&self, vm: &str) -> Result<DomainInfo> {
        self.check_vm(vm)?;
        let mut c = self.client.lock().await;
        self.describe(&mut c).await
    }

    async fn list_checkpoints(&self, vm: &str) -> Result<Vec<CheckpointInfo>> {
        self.check_vm(vm)?;
        let mut by_name: BTreeMap<String, Vec<CheckpointDisk>> = BTreeMap::new();
        for (disk, bitmaps) in self.bitmaps().await? {
            for b in bitmaps
                .into_iter()
                .filter(|b| b.persistent && !b.name.starts_with(fleece::PREFIX))
            {
                by_name
                    .entry(b.name.clone())
                    .or_default()
                    .push(CheckpointDisk {
                        disk: disk.clone(),
                        bitmap: b.name,
                    });
            }
        }
        Ok(by_name
            .into_iter()
            .map(|(name, disks)| CheckpointInfo {
                name,
                parent: None,
                creation_time: None,
                disks,
                xml: None,
            })
            .collect())
    }

    async fn begin_backup(&self, req: BackupRequest) -> Result<BackupSession> {
        self.check_vm(&req.vm)?;
        let mut c = self.client.lock().await;
        let nodes = nodes(&mut c).await?;
        validate(&self.vm, &req, &nodes)?;
        let infos: Vec<DiskInfo> = nodes.into_iter().map(|n| n.info).collect();
        let (fleece, exports) = fleece::setup(&mut c, &req, &infos).await?;
        drop(c);
        let release = QmpEnd {
            client: self.client.clone(),
            fleece,
            vm: self.vm.clone(),
        };
        Ok(BackupSession::new(
            self.vm.clone(),
            exports,
            req.new_checkpoint,
            Box::new(release),
        ))
    }

    async fn delete_checkpoint(
        &self,
        vm: &str,
        checkpoint: &str,
        metadata_only: bool,
    ) -> Result<()> {
        self.check_vm(vm)?;
        validate_name("checkpoint", checkpoint)?;
        if metadata_only {
            return Ok(()); // QMP keeps no checkpoint metadata beside the bitmaps.
        }
        let mut c = self.client.lock().await;
        let holders: Vec<String> = nodes(&mut c)
            .await?
            .into_iter()
            .filter(|n| n.bitmaps.iter().any(|b| b.name == checkpoint))
            .map(|n| n.info.target)
            .collect();
        if holders.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("vm {vm} has no checkpoint {checkpoint}"),
            ));
        }
        for node in holders {
            c.execute_value(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": checkpoint}),
            )
            .await?;
        }
        tracing::info!(vm, checkpoint, "checkpoint deleted");
        Ok(())
    }

    async fn check_checkpoint(
        &self,
        vm: &str,
        checkpoint: &str,
        disks: &[ExpectedDisk],
    ) -> Result<CheckpointHealth> {
        self.check_vm(vm)?;
        validate_name("checkpoint", checkpoint)?;
        let nodes = nodes(&mut *self.client.lock().await).await?;
        let mut problems = Vec::new();
        for want in disks {
            let disk = want.disk.clone();
            let Some(node) = nodes.iter().find(|n| n.info.target == want.disk) else {
                problems.push(CheckpointProblem::DiskMissing { disk });
                continue;
            };
            if node.info.capacity != want.capacity {
                problems.push(CheckpointProblem::SizeChanged {
                    disk,
                    was: want.capacity,
                    now: node.info.capacity,
                });
            }
            problems.extend(bitmap_problem(node, checkpoint));
        }
        Ok(CheckpointHealth::from_problems(problems))
    }

    async fn agent_responds(&self, _vm: &str) -> bool {
        false
    }

    async fn freeze(&self, vm: &str) -> Result<FreezeGuard> {
        Err(Error::new(
            ErrorKind::AgentUnavailable,
            format!("vm {vm}: the qmp adapter has no guest agent channel"),
        ))
    }
}
