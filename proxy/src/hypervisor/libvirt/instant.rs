//! Instant-recovery domains on libvirt: defined from a rewritten definition and started at
//! once (undefined again if the start fails, so no half-made domain stays), their state, and
//! their end: destroyed and undefined, but only a domain whose NBD disks are exactly the
//! exports named (so a domain someone else made under that name is never touched).

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::{ffi, lookup, virt_err, vm_state, LibvirtHypervisor};
use crate::hypervisor::xml_instant::nbd_exports;
use crate::hypervisor::{Error, ErrorKind, Result, VmState};

/// How an instant-recovery domain was ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It was running (or paused) and was destroyed, then undefined.
    Destroyed,
    /// It was shut off and was undefined.
    Undefined,
    /// There was no domain of that name.
    Gone,
}

impl LibvirtHypervisor {
    /// Defines a persistent domain from `domain_xml` and starts it; returns its name. If the
    /// start fails the definition is removed again and the start's error returned.
    pub async fn define_and_start(&self, domain_xml: &str) -> Result<String> {
        let xml = domain_xml.to_string();
        self.worker
            .call(move |c| {
                ffi::sent("domain", &xml);
                let dom = c
                    .define_domain_xml(&xml)
                    .map_err(virt_err("defining an instant-recovery domain".into()))?;
                let name = dom
                    .name()
                    .map_err(virt_err("name of the instant-recovery domain".into()))?;
                if let Err(e) = dom.create() {
                    let err = virt_err(format!("starting domain {name}"))(e);
                    if let Err(u) = undefine(&dom, &name) {
                        tracing::error!(domain = %name, "undefining the domain that did not start: {u}");
                    }
                    return Err(err);
                }
                tracing::info!(domain = %name, "instant-recovery domain started");
                Ok(name)
            })
            .await
    }

    /// The state of domain `name`; `None` once it no longer exists.
    pub async fn domain_state(&self, name: &str) -> Result<Option<VmState>> {
        let name = name.to_string();
        self.worker
            .call(move |c| match lookup(c, &name) {
                Ok(dom) => vm_state(&dom, &name).map(Some),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .await
    }

    /// Destroys (if it runs) and undefines domain `name`, after checking that its NBD disks
    /// are exactly `exports` (else `InvalidInput`, nothing done).
    pub async fn end_instant_domain(&self, name: &str, exports: &[String]) -> Result<Ended> {
        let (name, exports) = (name.to_string(), exports.to_vec());
        self.worker
            .call(move |c| end_blocking(c, &name, &exports))
            .await
    }
}

fn end_blocking(c: &Connect, name: &str, exports: &[String]) -> Result<Ended> {
    let dom = match lookup(c, name) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Ended::Gone),
        Err(e) => return Err(e),
    };
    let xml = dom
        .xml_desc(0)
        .map_err(virt_err(format!("xml of domain {name}")))?;
    let have = nbd_exports(&xml)?;
    if have != exports {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "domain {name} is not the instant recovery's: its NBD disks are {have:?}, not {exports:?}; it is left alone"
            ),
        ));
    }
    let ended = if vm_state(&dom, name)? == VmState::ShutOff {
        Ended::Undefined
    } else {
        match dom.destroy() {
            Ok(()) => Ended::Destroyed,
            // Shut off between the state and the destroy.
            Err(_) if vm_state(&dom, name)? == VmState::ShutOff => Ended::Undefined,
            Err(e) => return Err(virt_err(format!("destroying domain {name}"))(e)),
        }
    };
    undefine(&dom, name)?;
    tracing::info!(domain = %name, ?ended, "instant-recovery domain ended");
    Ok(ended)
}

/// Undefines `dom` with its managed save, snapshot and checkpoint metadata and its NVRAM
/// file (the copy's own: the rewrite dropped the original's `<nvram>`). A driver that knows
/// no NVRAM or checkpoints refuses those flags ("unsupported flags"; libvirt's test driver
/// does): it has neither to remove, so the undefine is asked again without them.
fn undefine(dom: &Domain, name: &str) -> Result<()> {
    let basic = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    let all =
        basic | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
    match dom.undefine_flags(all) {
        Err(e) if e.code().to_raw() == sys::VIR_ERR_INVALID_ARG => dom.undefine_flags(basic),
        r => r,
    }
    .map_err(virt_err(format!("undefining domain {name}")))
}
