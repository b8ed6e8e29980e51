//! The CLI verbs: each is one or a few API calls, printed as a table or, with `--json`, as
//! the API's JSON. Exit codes: 0 ok, 1 error, 3 refused (401/403), 4 not found, 5 job failed.

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{Client, ClientError};

/// Client verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// VMs the hypervisor sees.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Back up a VM (`backup VM [--full] [--wait]`), or `backup list [VM]` / `backup show ID`.
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
        #[arg(long)]
        vm: Option<String>,
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
        cmd: crate::cli_ops::PolicyCmd,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs with their last backup.
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
    let out = |v: &Value, table: &dyn Fn(&Value)| {
        if as_json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            table(v)
        }
    };
    match verb {
        Verb::Vm { cmd: VmCmd::List } => out(&c.call("GET", "/vms", None).await?, &vm_table),
        Verb::Backup {
            target,
            arg,
            full,
            wait,
        } => match (target.as_str(), arg) {
            ("list", vm) => {
                let q = vm.map(|v| format!("?vm={v}")).unwrap_or_default();
                out(
                    &c.call("GET", &format!("/backups{q}"), None).await?,
                    &backup_table,
                )
            }
            ("show", Some(id)) => out(
                &c.call("GET", &format!("/backups/{id}"), None).await?,
                &pretty,
            ),
            ("show", None) => anyhow::bail!("usage: sluice backup show ID"),
            (vm, _) => return backup(c, vm, full, wait, as_json).await,
        },
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
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
        } => {
            let body = json!({ "vm": vm, "keep_last": keep_last, "keep_daily": keep_daily,
                "keep_weekly": keep_weekly, "keep_monthly": keep_monthly, "dry_run": dry_run });
            out(&c.call("POST", "/prune", Some(body)).await?, &pretty)
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
                c.call("DELETE", &format!("/exports/{n}"), None).await?;
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
            no_wait,
        } => {
            let to = to.map(std::path::absolute).transpose()?;
            let body = json!({ "backup": id, "to": to, "format": format, "disk": disk,
                "overwrite": force, "as_domain": as_domain, "onto_vm": onto_vm, "confirm": confirm });
            let job = c.call("POST", "/restores", Some(body)).await?;
            let jid = job["id"].as_u64().context("job id in the answer")?;
            if no_wait {
                out(&job, &|_| println!("job {jid} queued: restore of {id}"));
                return Ok(0);
            }
            return crate::cli_ops::wait_job(c, jid, &format!("restore {id}"), as_json).await;
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
        Verb::Policy { cmd } => return crate::cli_ops::policy(c, cmd, as_json).await,
        Verb::Token { cmd } => match cmd {
            TokenCmd::Create { name, role, vms } => {
                let v = c
                    .call(
                        "POST",
                        "/tokens",
                        Some(json!({ "name": name, "role": role, "vms": vms })),
                    )
                    .await?;
                out(&v, &|v| {
                    println!(
                        "{}\n(shown once: store it now; id {})",
                        s(&v["token"]),
                        s(&v["id"])
                    )
                })
            }
            TokenCmd::List => out(&c.call("GET", "/tokens", None).await?, &pretty),
            TokenCmd::Revoke { id } => {
                c.call("DELETE", &format!("/tokens/{id}"), None).await?;
                println!("token {id} revoked");
            }
        },
    }
    Ok(0)
}

async fn backup(
    c: &Client,
    vm: &str,
    full: bool,
    wait: bool,
    as_json: bool,
) -> anyhow::Result<i32> {
    let mode = if full { "full" } else { "auto" };
    let job = c
        .call(
            "POST",
            &format!("/vms/{vm}/backups"),
            Some(json!({ "mode": mode })),
        )
        .await?;
    let id = job["id"].as_u64().context("job id in the answer")?;
    if !wait {
        if as_json {
            println!("{job}");
        } else {
            println!("job {id} queued: backup of {vm} ({mode})");
        }
        return Ok(0);
    }
    crate::cli_ops::wait_job(c, id, &format!("backup {vm}"), as_json).await
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
        "{:<24} {:<9} {:>5} {:<28}",
        "NAME", "STATE", "DISKS", "LAST BACKUP"
    );
    for r in rows(v.get("vms").unwrap_or(v)) {
        let disks = r["disks"].as_array().map_or(0, |d| d.len());
        println!(
            "{:<24} {:<9} {:>5} {:<28}",
            s(&r["name"]),
            s(&r["state"]),
            disks,
            s(&r["last_backup"]["id"])
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
