//! What several verbs need to know about a VM name: the uuid of the VM of that name on a
//! hypervisor (what the backup list and prune filter by), the hypervisors that have it, and
//! an `ambiguous_vm` refusal reworded with the `--hypervisor` values (or uuids) that pick one.

use crate::cli::client::{encode, Client, ClientError};
use crate::wire::backups::BackupSummary;
use crate::wire::vms::{VmInfo, VmList};

/// `?hypervisor=NAME`, or nothing.
pub fn on_hv(hv: Option<&str>) -> String {
    hv.map(|h| format!("?hypervisor={}", encode(h)))
        .unwrap_or_default()
}

/// The uuid of VM `vm` on hypervisor `hv`.
pub async fn vm_uuid(c: &Client, vm: &str, hv: &str) -> anyhow::Result<String> {
    let path = format!("/vms/{}?hypervisor={}", encode(vm), encode(hv));
    let v = c.get::<VmInfo>(&path).await.map_err(|e| {
        match e.downcast::<ClientError>() {
            Ok(mut ce) if ce.status == 404 && ce.message.starts_with(&format!("vm {vm} ")) => {
                ce.message.push_str(
                    " (a VM gone from its hypervisor: name it by its uuid, which `sluice backup list NAME` shows)",
                );
                ce.into()
            }
            Ok(ce) => ce.into(),
            Err(e) => e,
        }
    })?;
    Ok(v.body.uuid)
}

/// The VM uuids of a backup list, in first-seen order.
pub fn distinct_uuids(list: &[BackupSummary]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for b in list {
        if !out.contains(&b.vm_uuid) {
            out.push(b.vm_uuid.clone());
        }
    }
    out
}

/// An `ambiguous_vm` refusal reworded for the CLI: the `--hypervisor` values that pick one
/// (the hypervisors with a VM of that name now) and, for prune, the uuids `--vm` takes.
/// Other errors pass unchanged; the status (409, exit code 1) is kept.
pub async fn explain_ambiguous(
    c: &Client,
    vm: &str,
    e: anyhow::Error,
    prune: bool,
) -> anyhow::Error {
    let ce = match e.downcast::<ClientError>() {
        Ok(ce) if ce.code == "ambiguous_vm" => ce,
        Ok(ce) => return ce.into(),
        Err(e) => return e,
    };
    let on = hypervisors_having(c, vm).await;
    let message = if prune {
        prune_advice(c, vm, &ce.message, &on).await
    } else if on.len() > 1 {
        format!(
            "vm {vm} is on several hypervisors: pass --hypervisor NAME, one of: {}",
            on.join(", ")
        )
    } else {
        format!(
            "{}: pass --hypervisor NAME (`sluice vm list` shows which has it)",
            ce.message
        )
    };
    ClientError { message, ..ce }.into()
}

/// What `prune --vm NAME` takes instead of an ambiguous name: the uuids of the backed-up
/// VMs of that name, or `--hypervisor` with one of `on`.
async fn prune_advice(c: &Client, vm: &str, said: &str, on: &[String]) -> String {
    let path = format!("/backups?vm={}", encode(vm));
    let uuids = match c.get::<Vec<BackupSummary>>(&path).await {
        Ok(list) => distinct_uuids(&list.body),
        Err(_) => Vec::new(),
    };
    let mut m = if uuids.len() > 1 {
        format!(
            "vm {vm} names {} backed-up VMs: pass --vm UUID, one of: {}",
            uuids.len(),
            uuids.join(", ")
        )
    } else {
        format!("{said}: pass --vm UUID")
    };
    if !on.is_empty() {
        m.push_str(&format!(
            "; or --hypervisor NAME for the VM of that name there now, one of: {}",
            on.join(", ")
        ));
    }
    m
}

/// The hypervisors that list a VM named `vm` now, in configuration order (none if the list
/// cannot be had).
async fn hypervisors_having(c: &Client, vm: &str) -> Vec<String> {
    let Ok(list) = c.get::<VmList>("/vms").await else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for r in list.body.vms.into_iter().filter(|r| r.name == vm) {
        if !out.contains(&r.hypervisor) {
            out.push(r.hypervisor);
        }
    }
    out
}
