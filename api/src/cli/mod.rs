//! The CLI verbs: each is one or a few API calls, printed as a table or, with `--json`, as
//! the API's JSON. Exit codes: 0 ok, 1 error, 3 refused (401/403), 4 not found, 5 job failed.
//!
//! Verbs that name a VM take `--hypervisor NAME` (sent as `?hypervisor=`, or as a restore's
//! `hypervisor`); where the API has no such filter (backup lists, prune) the CLI resolves the
//! VM on that hypervisor to its uuid first. A name on several hypervisors without it is
//! refused by the daemon (409 `ambiguous_vm`), and the CLI's message names the `--hypervisor`
//! values that pick one. `vm list` names unreachable hypervisors on stderr, not in its table,
//! and still exits 0.

pub mod client;
pub mod verbs;

use std::collections::HashSet;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cli::client::{encode, Client, ClientError};
use crate::cli::verbs::print;

/// Client verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// VMs the hypervisors see.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// The cluster's hypervisors: `hypervisor list`.
    Hypervisor {
        #[command(subcommand)]
        cmd: HypervisorCmd,
    },
    /// Back up a VM (`backup VM [--full] [--wait] [--hypervisor NAME]`), or
    /// `backup list [VM] [--hypervisor NAME]` / `backup show ID`.
    Backup {
        /// VM name, or `list` / `show`.
        target: String,
        /// VM (for `list`) or backup id (for `show`).
        arg: Option<String>,
        /// Read every disk in full.
        #[arg(long)]
        full: bool,
        /// Wait for the job to end, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// The VM's hypervisor (needed when its name is on several). With `list`: only the
        /// backups of that hypervisor's VM (or, without a VM, of the VMs it has now).
        #[arg(long, value_name = "NAME")]
        hypervisor: Option<String>,
    },
    /// Verify the repository (or one backup).
    Verify {
        id: Option<String>,
        /// Re-hash every chunk.
        #[arg(long)]
        full: bool,
    },
    /// Apply a retention policy.
    Prune {
        /// Only this VM's backups (a name, or a uuid).
        #[arg(long)]
        vm: Option<String>,
        /// The hypervisor whose VM --vm names (pruned by that VM's uuid).
        #[arg(long, value_name = "NAME", requires = "vm")]
        hypervisor: Option<String>,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long)]
        dry_run: bool,
    },
    /// Reclaim the space of removed backups.
    Gc {
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve a backup over NBD (`export ID [--disk D] [--writable]`), or `export list` /
    /// `export close N`.
    Export {
        /// Backup id, or `list` / `close`.
        target: String,
        /// Export number (for `close`).
        arg: Option<String>,
        #[arg(long)]
        disk: Option<String>,
        /// Accept writes into a copy-on-write overlay (dropped at close).
        #[arg(long)]
        writable: bool,
    },
    /// Restore a backup: one disk to an image file (`restore ID --to PATH [--format F]
    /// [--disk D]`) or every disk as a new domain (`restore ID --as-domain NAME`). Waits for
    /// the job unless `--no-wait`.
    Restore {
        /// Backup id.
        id: String,
        /// Image file to write (inside a restore directory of the daemon).
        #[arg(long, conflicts_with = "as_domain")]
        to: Option<std::path::PathBuf>,
        /// qcow2 (default) or raw.
        #[arg(long)]
        format: Option<String>,
        /// Disk target (default: the backup's first disk).
        #[arg(long)]
        disk: Option<String>,
        /// Replace an existing file at --to.
        #[arg(long)]
        force: bool,
        /// Define a new domain of this name with the restored disks.
        #[arg(long)]
        as_domain: Option<String>,
        /// Write the backup back onto its own (shut-off) VM's disks; needs --confirm.
        #[arg(long, conflicts_with_all = ["to", "as_domain"])]
        onto_vm: bool,
        /// Confirm that --onto-vm overwrites the VM's disks.
        #[arg(long)]
        confirm: bool,
        /// The libvirt hypervisor of --as-domain / --onto-vm (default: the one with the
        /// backed-up VM, else the only libvirt one).
        #[arg(long, value_name = "NAME", conflicts_with = "to")]
        hypervisor: Option<String>,
        /// Return once the job is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// Jobs.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// Backup policies: `policy apply FILE [--dry-run]`, `policy list`, `policy show NAME`,
    /// `policy delete NAME`.
    Policy {
        #[command(subcommand)]
        cmd: crate::cli::verbs::PolicyCmd,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs with their hypervisor and last backup.
    List {
        /// Only the VMs of this hypervisor (only it is asked).
        #[arg(long, value_name = "NAME")]
        hypervisor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum HypervisorCmd {
    /// Every configured hypervisor, asked now: address, host, state, last error.
    List,
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    List,
    Show { id: u64 },
    Cancel { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token (its secret is printed once).
    Create {
        name: String,
        /// admin, operator, auditor or scoped.
        #[arg(long)]
        role: String,
        /// For scoped tokens: VM names or globs.
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

/// Runs a verb; returns the process exit code.
pub async fn run(c: &Client, verb: Verb, as_json: bool) -> i32 {
    match dispatch(c, verb, as_json).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<ClientError>() {
                Some(ce) if ce.status == 401 || ce.status == 403 => 3,
                Some(ce) if ce.status == 404 => 4,
                _ => 1,
            }
        }
    }
}

async fn dispatch(c: &Client, verb: Verb, as_json: bool) -> anyhow::Result<i32> {
    let out = |v: &Value, table: &dyn Fn(&Value)| print(v, as_json, table);
    match verb {
        Verb::Vm {
            cmd: VmCmd::List { hypervisor },
        } => vm_list(c, hypervisor.as_deref(), as_json).await?,
        Verb::Hypervisor {
            cmd: HypervisorCmd::List,
        } => out(
            &c.call("GET", "/hypervisors", None).await?,
            &hypervisor_table,
        ),
        Verb::Backup {
            target,
            arg,
            full,
            wait,
            hypervisor,
        } => {
            let hv = hypervisor.as_deref();
            match (target.as_str(), arg) {
                ("list", vm) => out(&backup_list(c, vm.as_deref(), hv).await?, &backup_table),
                ("show", _) if hv.is_some() => {
                    anyhow::bail!(
                        "--hypervisor does not apply to `backup show` (a backup id names its VM)"
                    )
                }
                ("show", Some(id)) => out(
                    &c.call("GET", &format!("/backups/{}", encode(&id)), None)
                        .await?,
                    &pretty,
                ),
                ("show", None) => anyhow::bail!("usage: sluice backup show ID"),
                (vm, _) => return backup(c, vm, hv, full, wait, as_json).await,
            }
        }
        Verb::Verify { id, full } => {
            let body = json!({ "backups": id.into_iter().collect::<Vec<_>>(), "full": full });
            let v = c.call("POST", "/verify", Some(body)).await?;
            out(&v, &verify_lines);
            if v["ok"] != true {
                return Ok(5);
            }
        }
        Verb::Prune {
            vm,
            hypervisor,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
        } => {
            let keep = json!({ "keep_last": keep_last, "keep_daily": keep_daily,
                "keep_weekly": keep_weekly, "keep_monthly": keep_monthly, "dry_run": dry_run });
            out(&prune(c, vm, hypervisor, keep).await?, &pretty)
        }
        Verb::Gc { dry_run } => out(
            &c.call("POST", "/gc", Some(json!({ "dry_run": dry_run })))
                .await?,
            &pretty,
        ),
        Verb::Export {
            target,
            arg,
            disk,
            writable,
        } => match (target.as_str(), arg) {
            ("list", _) => out(&c.call("GET", "/exports", None).await?, &pretty),
            ("close", Some(n)) => {
                c.call("DELETE", &format!("/exports/{}", encode(&n)), None)
                    .await?;
                println!("export {n} closed");
            }
            ("close", None) => anyhow::bail!("usage: sluice export close N"),
            (id, _) => {
                let body = json!({ "backup": id, "disk": disk, "writable": writable });
                let v = c.call("POST", "/exports", Some(body)).await?;
                out(&v, &export_line)
            }
        },
        Verb::Restore {
            id,
            to,
            format,
            disk,
            force,
            as_domain,
            onto_vm,
            confirm,
            hypervisor,
            no_wait,
        } => {
            let to = to.map(std::path::absolute).transpose()?;
            let body = json!({ "backup": id, "to": to, "format": format, "disk": disk,
                "overwrite": force, "as_domain": as_domain, "onto_vm": onto_vm,
                "confirm": confirm, "hypervisor": hypervisor });
            let job = c
                .call("POST", "/restores", Some(body))
                .await
                .map_err(restore_hint)?;
            let jid = job["id"].as_u64().context("job id in the answer")?;
            if no_wait {
                out(&job, &|_| println!("job {jid} queued: restore of {id}"));
                return Ok(0);
            }
            return crate::cli::verbs::wait_job(c, jid, &format!("restore {id}"), as_json).await;
        }
        Verb::Job { cmd } => match cmd {
            JobCmd::List => out(&c.call("GET", "/jobs", None).await?, &job_table),
            JobCmd::Show { id } => {
                out(&c.call("GET", &format!("/jobs/{id}"), None).await?, &pretty)
            }
            JobCmd::Cancel { id } => out(
                &c.call("POST", &format!("/jobs/{id}/cancel"), None).await?,
                &pretty,
            ),
        },
        Verb::Policy { cmd } => return crate::cli::verbs::policy(c, cmd, as_json).await,
        Verb::Token { cmd } => token(c, cmd, as_json).await?,
    }
    Ok(0)
}

async fn token(c: &Client, cmd: TokenCmd, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { name, role, vms } => {
            let body = json!({ "name": name, "role": role, "vms": vms });
            let v = c.call("POST", "/tokens", Some(body)).await?;
            print(&v, as_json, |v| {
                println!(
                    "{}\n(shown once: store it now; id {})",
                    s(&v["token"]),
                    s(&v["id"])
                )
            })
        }
        TokenCmd::List => print(&c.call("GET", "/tokens", None).await?, as_json, pretty),
        TokenCmd::Revoke { id } => {
            c.call("DELETE", &format!("/tokens/{}", encode(&id)), None)
                .await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

/// `?hypervisor=NAME`, or nothing.
fn on_hv(hv: Option<&str>) -> String {
    hv.map(|h| format!("?hypervisor={}", encode(h)))
        .unwrap_or_default()
}

/// `vm list`: the table (or JSON) on stdout, each unreachable hypervisor as a note on stderr.
async fn vm_list(c: &Client, hv: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let v = c.call("GET", &format!("/vms{}", on_hv(hv)), None).await?;
    print(&v, as_json, vm_table);
    for u in rows(&v["unreachable"]) {
        eprintln!(
            "note: the VMs of hypervisor {} are not listed: {}",
            s(&u["hypervisor"]),
            s(&u["error"])
        );
    }
    Ok(())
}

async fn backup(
    c: &Client,
    vm: &str,
    hv: Option<&str>,
    full: bool,
    wait: bool,
    as_json: bool,
) -> anyhow::Result<i32> {
    let mode = if full { "full" } else { "auto" };
    let path = format!("/vms/{}/backups{}", encode(vm), on_hv(hv));
    let job = match c.call("POST", &path, Some(json!({ "mode": mode }))).await {
        Ok(job) => job,
        Err(e) => return Err(explain_ambiguous(c, vm, e, false).await),
    };
    let id = job["id"].as_u64().context("job id in the answer")?;
    if !wait {
        if as_json {
            println!("{job}");
        } else {
            let on = job["hypervisor"].as_str().unwrap_or("?");
            println!("job {id} queued: backup of {vm} on {on} ({mode})");
        }
        return Ok(0);
    }
    crate::cli::verbs::wait_job(c, id, &format!("backup {vm}"), as_json).await
}

/// The uuid of VM `vm` on hypervisor `hv` (what the backup list and prune filter by).
async fn vm_uuid(c: &Client, vm: &str, hv: &str) -> anyhow::Result<String> {
    let path = format!("/vms/{}?hypervisor={}", encode(vm), encode(hv));
    let v = c.call("GET", &path, None).await.map_err(|e| {
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
    Ok(v["uuid"]
        .as_str()
        .context("uuid in the VM's answer")?
        .to_string())
}

/// `backup list [VM] [--hypervisor NAME]`: the API's list, filtered by uuid for a hypervisor.
async fn backup_list(c: &Client, vm: Option<&str>, hv: Option<&str>) -> anyhow::Result<Value> {
    match (vm, hv) {
        (None, None) => c.call("GET", "/backups", None).await,
        (Some(vm), None) => {
            let v = c
                .call("GET", &format!("/backups?vm={}", encode(vm)), None)
                .await?;
            let uuids = distinct_uuids(&v);
            if uuids.len() > 1 {
                eprintln!(
                    "note: {} VMs named {vm} have backups (uuids {}): --hypervisor NAME or `backup list UUID` lists one",
                    uuids.len(),
                    uuids.join(", ")
                );
            }
            Ok(v)
        }
        (Some(vm), Some(hv)) => {
            let uuid = vm_uuid(c, vm, hv).await?;
            c.call("GET", &format!("/backups?vm={}", encode(&uuid)), None)
                .await
        }
        (None, Some(hv)) => {
            let v = c
                .call("GET", &format!("/vms?hypervisor={}", encode(hv)), None)
                .await?;
            if let Some(u) = rows(&v["unreachable"]).first() {
                anyhow::bail!(
                    "hypervisor {hv} is unreachable, so which backups are of its VMs is unknown: {}",
                    s(&u["error"])
                );
            }
            let uuids: HashSet<&str> = rows(&v["vms"])
                .iter()
                .filter_map(|r| r["uuid"].as_str())
                .collect();
            let all = c.call("GET", "/backups", None).await?;
            let of_hv = rows(&all)
                .iter()
                .filter(|b| b["vm_uuid"].as_str().is_some_and(|u| uuids.contains(u)))
                .cloned();
            Ok(Value::Array(of_hv.collect()))
        }
    }
}

/// The VM uuids of a backup list, in first-seen order.
fn distinct_uuids(list: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for u in rows(list).iter().filter_map(|b| b["vm_uuid"].as_str()) {
        if !out.iter().any(|o| o == u) {
            out.push(u.to_string());
        }
    }
    out
}

/// `prune`: with `--hypervisor`, `--vm` is sent as the uuid of that hypervisor's VM.
async fn prune(
    c: &Client,
    vm: Option<String>,
    hv: Option<String>,
    mut body: Value,
) -> anyhow::Result<Value> {
    let sent = match (&vm, &hv) {
        (Some(vm), Some(hv)) => Some(vm_uuid(c, vm, hv).await?),
        _ => vm.clone(),
    };
    body["vm"] = json!(sent);
    match c.call("POST", "/prune", Some(body)).await {
        Ok(v) => Ok(v),
        Err(e) => Err(explain_ambiguous(c, vm.as_deref().unwrap_or(""), e, true).await),
    }
}

/// An `ambiguous_vm` refusal reworded for the CLI: the `--hypervisor` values that pick one
/// (the hypervisors with a VM of that name now) and, for prune, the uuids `--vm` takes.
/// Other errors pass unchanged; the status (409, exit code 1) is kept.
async fn explain_ambiguous(c: &Client, vm: &str, e: anyhow::Error, prune: bool) -> anyhow::Error {
    let ce = match e.downcast::<ClientError>() {
        Ok(ce) if ce.code == "ambiguous_vm" => ce,
        Ok(ce) => return ce.into(),
        Err(e) => return e,
    };
    let on = hypervisors_having(c, vm).await;
    let message = if prune {
        let uuids = match c
            .call("GET", &format!("/backups?vm={}", encode(vm)), None)
            .await
        {
            Ok(list) => distinct_uuids(&list),
            Err(_) => Vec::new(),
        };
        let mut m = if uuids.len() > 1 {
            format!(
                "vm {vm} names {} backed-up VMs: pass --vm UUID, one of: {}",
                uuids.len(),
                uuids.join(", ")
            )
        } else {
            format!("{}: pass --vm UUID", ce.message)
        };
        if !on.is_empty() {
            m.push_str(&format!(
                "; or --hypervisor NAME for the VM of that name there now, one of: {}",
                on.join(", ")
            ));
        }
        m
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

/// The hypervisors that list a VM named `vm` now, in configuration order (none if the list
/// cannot be had).
async fn hypervisors_having(c: &Client, vm: &str) -> Vec<String> {
    let Ok(list) = c.call("GET", "/vms", None).await else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for r in rows(&list["vms"]).iter().filter(|r| r["name"] == vm) {
        let h = s(&r["hypervisor"]);
        if !out.contains(&h) {
            out.push(h);
        }
    }
    out
}

/// A restore refused for want of a hypervisor: the API says `"hypervisor"`, the CLI
/// `--hypervisor`.
fn restore_hint(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ClientError>() {
        Ok(mut ce) if ce.status == 400 && ce.message.contains("\"hypervisor\"") => {
            ce.message.push_str(
                " (with the CLI: --hypervisor NAME; `sluice hypervisor list` names them)",
            );
            ce.into()
        }
        Ok(ce) => ce.into(),
        Err(e) => e,
    }
}

fn verify_lines(v: &Value) {
    let verdict = if v["ok"] == true {
        "ok"
    } else {
        "PROBLEMS FOUND"
    };
    println!(
        "verify: {verdict}: {} backups, {} chunks ({} re-hashed)",
        s(&v["backups"]),
        s(&v["chunks"]),
        s(&v["chunks_rehashed"])
    );
    for p in rows(&v["problems"]) {
        println!("  {}: {}", s(&p["kind"]), s(&p["detail"]));
    }
    for b in rows(&v["affected_backups"]) {
        println!("  affected backup: {}", s(b));
    }
}

fn export_line(v: &Value) {
    let mode = if v["writable"] == true {
        "writable (writes go to an overlay, dropped at close)"
    } else {
        "read-only"
    };
    let uri = s(&v["uri"]);
    println!("export {} ({mode}): {uri}", s(&v["id"]));
    if let Some(hint) = qemu_hint(&uri) {
        println!("  qemu-img/qemu: {hint}");
    }
}

/// QEMU does not read libnbd's `tls-certificates=` from a URI: the options it needs instead.
fn qemu_hint(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("nbds://")?;
    let (addr, rest) = rest.split_once('/')?;
    let (export, dir) = rest.split_once("?tls-certificates=")?;
    let (host, port) = addr.rsplit_once(':')?;
    Some(format!(
        "--object tls-creds-x509,id=tls0,dir={dir},endpoint=client --image-opts driver=nbd,host={host},port={port},export={export},tls-creds=tls0"
    ))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn pretty(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], |a| a.as_slice())
}

fn vm_table(v: &Value) {
    println!(
        "{:<24} {:<16} {:<9} {:>5} {:<28}",
        "NAME", "HYPERVISOR", "STATE", "DISKS", "LAST BACKUP"
    );
    for r in rows(v.get("vms").unwrap_or(v)) {
        let disks = r["disks"].as_array().map_or(0, |d| d.len());
        println!(
            "{:<24} {:<16} {:<9} {:>5} {:<28}",
            s(&r["name"]),
            s(&r["hypervisor"]),
            s(&r["state"]),
            disks,
            s(&r["last_backup"]["id"])
        );
    }
}

fn hypervisor_table(v: &Value) {
    println!(
        "{:<16} {:<7} {:<40} {:<20} {:<11} {:>4} LAST ERROR",
        "NAME", "KIND", "URI/SOCKET", "HOST", "STATE", "VMS"
    );
    for h in rows(v) {
        let (name, error) = (s(&h["name"]), s(&h["error"]));
        let address = s(if h["uri"].is_string() {
            &h["uri"]
        } else {
            &h["socket"]
        });
        // The row already names the hypervisor, its address and state.
        let said = format!("hypervisor {name} ({address}) is unreachable: ");
        println!(
            "{name:<16} {:<7} {address:<40} {:<20} {:<11} {:>4} {}",
            s(&h["kind"]),
            s(&h["host"]),
            s(&h["state"]),
            s(&h["vms"]),
            error.strip_prefix(&said).unwrap_or(&error)
        );
    }
}

fn backup_table(v: &Value) {
    println!(
        "{:<28} {:<24} {:<13} {:>12} {:<9}",
        "ID", "VM", "MODE", "STORED", "PROTECTED"
    );
    for r in rows(v) {
        println!(
            "{:<28} {:<24} {:<13} {:>12} {:<9}",
            s(&r["id"]),
            s(&r["vm"]),
            s(&r["mode"]),
            s(&r["bytes_stored"]),
            s(&r["protected"])
        );
    }
}

fn job_table(v: &Value) {
    println!(
        "{:>5} {:<8} {:<24} {:<10} {:<9} MESSAGE",
        "ID", "KIND", "VM", "STATE", "MODE"
    );
    for r in rows(v) {
        println!(
            "{:>5} {:<8} {:<24} {:<10} {:<9} {}",
            s(&r["id"]),
            s(&r["kind"]),
            s(&r["vm"]),
            s(&r["state"]),
            s(&r["mode"]),
            s(&r["message"])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::qemu_hint;

    #[test]
    fn tls_export_uris_get_the_qemu_options() {
        let uri = "nbds://127.0.0.1:10809/web-1/vda@20261122T073940Z-77d97d12?tls-certificates=/var/lib/sluice/nbd-tls";
        assert_eq!(
            qemu_hint(uri).unwrap(),
            "--object tls-creds-x509,id=tls0,dir=/var/lib/sluice/nbd-tls,endpoint=client \
             --image-opts driver=nbd,host=127.0.0.1,port=10809,\
             export=web-1/vda@20261122T073940Z-77d97d12,tls-creds=tls0"
        );
        assert_eq!(qemu_hint("nbd://127.0.0.1:10809/web-1/vda@x"), None);
    }
}
