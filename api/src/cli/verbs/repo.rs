//! Repository maintenance: `verify [ID] [--full]`, `prune --keep-… [--vm VM [--hypervisor
//! H]] [--dry-run]`, `gc [--dry-run]`. Verify exits 5 when it found problems.
//!
//! The API's prune has no hypervisor filter: with `--hypervisor`, `--vm` is sent as the uuid
//! of that hypervisor's VM.

use clap::Args;

use crate::cli::client::Client;
use crate::cli::table::{show, size};
use crate::cli::verbs::lookup::{explain_ambiguous, vm_uuid};
use crate::wire::repo::{
    GcRequest, GcResponse, PruneRequest, PruneResponse, VerifyRequest, VerifyResponse,
};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only this backup.
    pub id: Option<String>,
    /// Re-hash every chunk.
    #[arg(long)]
    pub full: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only this VM's backups (a name, or a uuid).
    #[arg(long)]
    pub vm: Option<String>,
    /// The hypervisor whose VM --vm names (pruned by that VM's uuid).
    #[arg(long, value_name = "NAME", requires = "vm")]
    pub hypervisor: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Say what would be freed; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `verify`: exit 0 when the repository (or the backup) is sound, 5 when not.
pub async fn verify(c: &Client, a: VerifyArgs, as_json: bool) -> anyhow::Result<i32> {
    let req = VerifyRequest {
        backups: a.id.into_iter().collect(),
        full: a.full,
    };
    let v = c.post::<VerifyResponse>("/verify", &req).await?;
    show(&v, as_json, verify_lines);
    Ok(if v.body.ok { 0 } else { 5 })
}

fn verify_lines(v: &VerifyResponse) {
    let verdict = if v.ok { "ok" } else { "PROBLEMS FOUND" };
    println!(
        "verify: {verdict}: {} backups, {} chunks ({} re-hashed)",
        v.backups, v.chunks, v.chunks_rehashed
    );
    for p in &v.problems {
        println!("  {}: {}", p.kind, p.detail);
    }
    for b in &v.affected_backups {
        println!("  affected backup: {b}");
    }
    if v.forgotten > 0 {
        println!(
            "  {} bad stored copies forgotten: the next backup of the affected vms stores them again (back them up now)",
            v.forgotten
        );
    }
}

/// `prune`.
pub async fn prune(c: &Client, a: PruneArgs, as_json: bool) -> anyhow::Result<i32> {
    let vm = match (&a.vm, &a.hypervisor) {
        (Some(vm), Some(hv)) => Some(vm_uuid(c, vm, hv).await?),
        _ => a.vm.clone(),
    };
    let req = PruneRequest {
        vm,
        keep_last: a.keep_last,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        dry_run: a.dry_run,
        ..PruneRequest::default()
    };
    let v = match c.post::<PruneResponse>("/prune", &req).await {
        Ok(v) => v,
        Err(e) => return Err(explain_ambiguous(c, a.vm.as_deref().unwrap_or(""), e, true).await),
    };
    show(&v, as_json, prune_lines);
    Ok(0)
}

fn prune_lines(p: &PruneResponse) {
    let (label, removed) = if p.dry_run {
        ("prune (dry run)", "would remove")
    } else {
        ("prune", "removed")
    };
    println!(
        "{label}: {} kept, {removed} {}",
        p.kept.len(),
        p.removed.len()
    );
    for id in &p.removed {
        println!("  {removed} {id}");
    }
}

/// `gc`.
pub async fn gc(c: &Client, a: GcArgs, as_json: bool) -> anyhow::Result<i32> {
    let req = GcRequest { dry_run: a.dry_run };
    let v = c.post::<GcResponse>("/gc", &req).await?;
    show(&v, as_json, |g| {
        let (label, freed) = if a.dry_run {
            ("gc (dry run)", "would free")
        } else {
            ("gc", "freed")
        };
        println!(
            "{label}: {freed} {}; {} packs deleted, {} repacked; {} packs hold {} live blobs",
            size(g.bytes_freed),
            g.packs_deleted,
            g.packs_repacked,
            g.packs,
            g.live_blobs
        );
    });
    Ok(0)
}
