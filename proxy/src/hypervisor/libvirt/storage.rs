//! Storage pools and volumes of a libvirt hypervisor, for restores that write there over the
//! libvirt connection alone: a pool looked up by name, a volume created (never over an
//! existing one), copied into another format by the hypervisor, deleted; domains undefined
//! and started by name. The upload of a volume's bytes is `super::upload`'s.
//!
//! Owns the volume XML sent to libvirt (built here, logged under `sluice::sent_xml` like every
//! XML document the adapter sends) and the reading of pool and volume descriptions. It does not
//! decide names or what to clean up: `crate::restore::volume` does.

use std::path::PathBuf;

use roxmltree::Document;
use virt::connect::Connect;
use virt::error::Error as VirtError;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use super::{ffi, lookup, virt_err, LibvirtHypervisor};
use crate::hypervisor::xml::escape;
use crate::hypervisor::{Cause, Error, ErrorKind, Result};

/// A storage pool as libvirt describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    /// libvirt's pool type (`dir`, `fs`, `netfs`, `logical`, `rbd`, …).
    pub pool_type: String,
    /// Whether the pool is started (only an active pool takes volumes).
    pub active: bool,
    /// The pool's target path on the hypervisor (a directory for file pools), if it has one.
    pub target: Option<PathBuf>,
}

impl PoolInfo {
    /// Whether the pool keeps its volumes as files in a directory (`dir`, `fs`, `netfs`):
    /// only those hold qcow2 volumes and sparse files.
    pub fn is_file_pool(&self) -> bool {
        matches!(self.pool_type.as_str(), "dir" | "fs" | "netfs")
    }
}

/// What backs a volume, as a domain's disk would name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// A file: `<disk type='file'>` with the volume's path.
    File,
    /// A block device: `<disk type='block'>` with the volume's path.
    Block,
    /// Anything else (network volumes, …): `<disk type='volume'>` naming pool and volume.
    Other,
}

/// A storage volume as libvirt describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub pool: String,
    pub name: String,
    /// The path the pool reports (a file or device on the hypervisor).
    pub path: String,
    pub kind: VolumeKind,
    /// Virtual size, bytes.
    pub capacity: u64,
    /// Bytes the volume takes on the hypervisor's storage.
    pub allocation: u64,
}

/// libvirt errors of storage calls: a missing pool or volume is [`ErrorKind::NotFound`], the
/// rest as [`virt_err`] decides.
fn storage_err(context: String) -> impl FnOnce(VirtError) -> Error {
    move |e| match e.code().to_raw() {
        sys::VIR_ERR_NO_STORAGE_POOL | sys::VIR_ERR_NO_STORAGE_VOL => {
            Error::new(ErrorKind::NotFound, context).with_source(Cause(e.message().to_string()))
        }
        _ => virt_err(context)(e),
    }
}

fn pool_names(conn: &Connect) -> String {
    let mut names: Vec<String> = conn
        .list_all_storage_pools(0)
        .map(|pools| pools.iter().filter_map(|p| p.name().ok()).collect())
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "it has none".into()
    } else {
        format!("its pools: {}", names.join(", "))
    }
}

/// Pool `name`; a missing one is [`ErrorKind::NotFound`] naming the pools there are.
fn pool(conn: &Connect, name: &str) -> Result<StoragePool> {
    conn.lookup_storage_pool_by_name(name).map_err(|e| {
        let missing = e.code().to_raw() == sys::VIR_ERR_NO_STORAGE_POOL;
        let ctx = if missing {
            format!("storage pool {name} not found ({})", pool_names(conn))
        } else {
            format!("storage pool {name}")
        };
        storage_err(ctx)(e)
    })
}

fn pool_info(p: &StoragePool, name: &str) -> Result<PoolInfo> {
    let ctx = || format!("storage pool {name}");
    let xml = p.xml_desc(0).map_err(storage_err(ctx()))?;
    let (pool_type, target) = parse_pool(&xml).map_err(|e| invalid(ctx(), e))?;
    let active = p.is_active().map_err(storage_err(ctx()))?;
    Ok(PoolInfo {
        name: name.to_string(),
        pool_type,
        active,
        target,
    })
}

fn invalid(what: String, e: roxmltree::Error) -> Error {
    Error::new(
        ErrorKind::Failed,
        format!("{what}: description does not parse"),
    )
    .with_source(e)
}

/// The pool's type and target path from its XML.
fn parse_pool(xml: &str) -> std::result::Result<(String, Option<PathBuf>), roxmltree::Error> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let pool_type = root.attribute("type").unwrap_or_default().to_string();
    let target = root
        .children()
        .find(|n| n.has_tag_name("target"))
        .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
        .and_then(|p| p.text())
        .map(|t| PathBuf::from(t.trim()));
    Ok((pool_type, target))
}

fn volume_info(v: &StorageVol, pool: &str, name: &str) -> Result<VolumeInfo> {
    let ctx = || format!("volume {name} of storage pool {pool}");
    let info = v.info().map_err(storage_err(ctx()))?;
    let kind = match info.kind {
        sys::VIR_STORAGE_VOL_FILE => VolumeKind::File,
        sys::VIR_STORAGE_VOL_BLOCK => VolumeKind::Block,
        _ => VolumeKind::Other,
    };
    Ok(VolumeInfo {
        pool: pool.to_string(),
        name: name.to_string(),
        path: v.path().map_err(storage_err(ctx()))?,
        kind,
        capacity: info.capacity,
        allocation: info.allocation,
    })
}

/// The XML of a new volume: `capacity` bytes in `format` (`raw`, `qcow2`); sparse (no
/// allocation) in a file pool. A raw volume names no format, so every pool type takes it
/// (a logical pool has no formats).
pub(super) fn volume_xml(name: &str, capacity: u64, format: &str, file_pool: bool) -> String {
    let mut x = format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>",
        escape(name)
    );
    if file_pool {
        x.push_str("<allocation unit='bytes'>0</allocation>");
    }
    if format != "raw" {
        x.push_str(&format!(
            "<target><format type='{}'/></target>",
            escape(format)
        ));
    }
    x.push_str("</volume>");
    x
}

/// A volume created with `create`; `None` when the pool already has one of that name
/// (libvirt refuses to create it, so nothing was replaced).
fn created(
    r: std::result::Result<StorageVol, VirtError>,
    pool: &str,
    name: &str,
) -> Result<Option<VolumeInfo>> {
    match r {
        Ok(v) => volume_info(&v, pool, name).map(Some),
        Err(e) if e.code().to_raw() == sys::VIR_ERR_STORAGE_VOL_EXIST => Ok(None),
        Err(e) => Err(storage_err(format!(
            "creating volume {name} in storage pool {pool}"
        ))(e)),
    }
}

/// Whether an error of a volume deletion says the volume is still busy (an upload stream
/// the hypervisor has not closed yet).
fn still_busy(e: &VirtError) -> bool {
    e.code().to_raw() == sys::VIR_ERR_OPERATION_INVALID
}

/// Deletes volume `name` of `pool`, waiting up to [`BUSY_WAIT`] for an upload stream that was
/// just aborted to let go of it. A volume already gone is no error.
fn delete(conn: &Connect, pool_name: &str, name: &str) -> Result<()> {
    let ctx = || format!("deleting volume {name} of storage pool {pool_name}");
    let p = pool(conn, pool_name)?;
    let v = match p.lookup_storage_vol_by_name(name) {
        Ok(v) => v,
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_STORAGE_VOL => return Ok(()),
        Err(e) => return Err(storage_err(ctx())(e)),
    };
    let start = std::time::Instant::now();
    loop {
        match v.delete(sys::VIR_STORAGE_VOL_DELETE_NORMAL) {
            Ok(()) => return Ok(()),
            Err(e) if still_busy(&e) && start.elapsed() < BUSY_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(storage_err(ctx())(e)),
        }
    }
}

/// How long a deletion waits for a volume an aborted upload still holds.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn undefine(conn: &Connect, name: &str) -> Result<()> {
    let dom = match conn.lookup_domain_by_name(name) {
        Ok(d) => d,
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => return Ok(()),
        Err(e) => return Err(virt_err(format!("vm {name}"))(e)),
    };
    // A domain started by the restore is powered off first; one that is not running refuses.
    let _ = dom.destroy();
    let flags = sys::VIR_DOMAIN_UNDEFINE_NVRAM
        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    dom.undefine_flags(flags)
        .map_err(virt_err(format!("undefining vm {name}")))
}

impl LibvirtHypervisor {
    /// Storage pool `name`: [`ErrorKind::NotFound`] (naming the pools there are) if the
    /// hypervisor has none of that name.
    pub async fn storage_pool(&self, name: &str) -> Result<PoolInfo> {
        let name = name.to_string();
        self.worker
            .call(move |c| pool_info(&pool(c, &name)?, &name))
            .await
    }

    /// Volume `name` of pool `pool_name`, if there is one. The pool is refreshed first (when
    /// it can be: not while an upload runs in it), so a file put in a pool's directory behind
    /// libvirt's back counts too.
    pub async fn storage_volume(&self, pool_name: &str, name: &str) -> Result<Option<VolumeInfo>> {
        let (pool_name, name) = (pool_name.to_string(), name.to_string());
        self.worker
            .call(move |c| {
                let p = pool(c, &pool_name)?;
                let _ = p.refresh(0);
                match p.lookup_storage_vol_by_name(&name) {
                    Ok(v) => volume_info(&v, &pool_name, &name).map(Some),
                    Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_STORAGE_VOL => Ok(None),
                    Err(e) => Err(storage_err(format!(
                        "volume {name} of storage pool {pool_name}"
                    ))(e)),
                }
            })
            .await
    }

    /// Creates volume `name` of `capacity` bytes in `format` (`raw`, `qcow2`) in pool
    /// `pool_name`: sparse in a file pool. `None` when a volume of that name exists already
    /// (it is left as it is).
    pub async fn create_volume(
        &self,
        pool_name: &str,
        name: &str,
        capacity: u64,
        format: &str,
    ) -> Result<Option<VolumeInfo>> {
        let (pool_name, name, format) =
            (pool_name.to_string(), name.to_string(), format.to_string());
        self.worker
            .call(move |c| {
                let p = pool(c, &pool_name)?;
                let file_pool = pool_info(&p, &pool_name)?.is_file_pool();
                let xml = volume_xml(&name, capacity, &format, file_pool);
                ffi::sent("volume", &xml);
                created(StorageVol::create_xml(&p, &xml, 0), &pool_name, &name)
            })
            .await
    }

    /// Creates volume `name` in pool `pool_name` as a copy of its volume `from` converted to
    /// `format` by the hypervisor (`qemu-img convert` there, which keeps holes unallocated).
    /// `None` when a volume of that name exists already.
    pub async fn copy_volume(
        &self,
        pool_name: &str,
        from: &str,
        name: &str,
        format: &str,
    ) -> Result<Option<VolumeInfo>> {
        let (pool_name, from, name, format) = (
            pool_name.to_string(),
            from.to_string(),
            name.to_string(),
            format.to_string(),
        );
        self.worker
            .call(move |c| {
                let p = pool(c, &pool_name)?;
                let ctx = format!("volume {from} of storage pool {pool_name}");
                let src = p
                    .lookup_storage_vol_by_name(&from)
                    .map_err(storage_err(ctx.clone()))?;
                let size = src.info().map_err(storage_err(ctx))?.capacity;
                let file_pool = pool_info(&p, &pool_name)?.is_file_pool();
                let xml = volume_xml(&name, size, &format, file_pool);
                ffi::sent("volume", &xml);
                created(
                    StorageVol::create_xml_from(&p, &xml, &src, 0),
                    &pool_name,
                    &name,
                )
            })
            .await
    }

    /// Deletes volume `name` of pool `pool_name` (waiting briefly for an upload that was just
    /// aborted to let go of it); a volume already gone is no error.
    pub async fn delete_volume(&self, pool_name: &str, name: &str) -> Result<()> {
        let (pool_name, name) = (pool_name.to_string(), name.to_string());
        self.worker
            .call(move |c| delete(c, &pool_name, &name))
            .await
    }

    /// Whether the hypervisor has a domain named `name`.
    pub async fn has_domain(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.worker
            .call(move |c| match c.lookup_domain_by_name(&name) {
                Ok(_) => Ok(true),
                Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => Ok(false),
                Err(e) => Err(virt_err(format!("vm {name}"))(e)),
            })
            .await
    }

    /// Starts the defined domain `name`.
    pub async fn start_domain(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.worker
            .call(move |c| {
                lookup(c, &name)?
                    .create()
                    .map_err(virt_err(format!("starting vm {name}")))
            })
            .await
    }

    /// Powers off (if running) and undefines domain `name` with its NVRAM and checkpoint and
    /// snapshot metadata; a domain already gone is no error. Only for a domain Sluice defined
    /// itself (a restore undoing its own work).
    pub async fn undefine_domain(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.worker.call(move |c| undefine(c, &name)).await
    }

    /// [`Self::delete_volume`] of each of `volumes` and [`Self::undefine_domain`] of `domain`,
    /// queued on the libvirt thread without waiting (a restore's guard dropped before it
    /// could clean up); every failure is logged naming what is left.
    pub fn forget_in_background(&self, domain: Option<String>, volumes: Vec<(String, String)>) {
        self.worker.fire(move |c| {
            if let Some(d) = domain {
                if let Err(e) = undefine(c, &d) {
                    tracing::error!(vm = %d, error = %catalog::Chain(&e), "a restored domain is left defined");
                }
            }
            for (pool, vol) in volumes {
                if let Err(e) = delete(c, &pool, &vol) {
                    tracing::error!(pool = %pool, volume = %vol, error = %catalog::Chain(&e), "a restored volume is left");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_xml_is_sparse_in_file_pools_and_names_only_non_raw_formats() {
        assert_eq!(
            volume_xml("a&b-vda.qcow2", 1 << 20, "qcow2", true),
            "<volume><name>a&amp;b-vda.qcow2</name><capacity unit='bytes'>1048576</capacity>\
             <allocation unit='bytes'>0</allocation><target><format type='qcow2'/></target>\
             </volume>"
        );
        assert_eq!(
            volume_xml("lv", 4096, "raw", false),
            "<volume><name>lv</name><capacity unit='bytes'>4096</capacity></volume>"
        );
    }

    #[test]
    fn pool_descriptions_give_type_and_target() {
        let xml = "<pool type='dir'><name>p</name><source/>\
                   <target><path>/var/lib/libvirt/images</path></target></pool>";
        let (t, path) = parse_pool(xml).unwrap();
        assert_eq!(t, "dir");
        assert_eq!(path, Some(PathBuf::from("/var/lib/libvirt/images")));
        let rbd = "<pool type='rbd'><name>ceph</name><source><name>rbd</name></source></pool>";
        assert_eq!(parse_pool(rbd).unwrap(), ("rbd".into(), None));
        let info = PoolInfo {
            name: "p".into(),
            pool_type: "logical".into(),
            active: true,
            target: None,
        };
        assert!(!info.is_file_pool());
        assert!(parse_pool("<pool").is_err());
    }
}
