//! The CLI verbs: each is one or a few API calls, printed as a table or, with `--json`, as
//! the API's JSON. Exit codes: 0 ok, 1 error, 2 usage or invalid policy file, 3 refused
//! (401/403), 4 not found, 5 job failed or cancelled / verify found problems.
//!
//! Verbs that name a VM take `--hypervisor NAME` (sent as `?hypervisor=`, or as a restore's
//! `hypervisor`); where the API has no such filter (backup lists, prune) the CLI resolves the
//! VM on that hypervisor to its uuid first. A name on several hypervisors without it is
//! refused by the daemon (409 `ambiguous_vm`), and the CLI's message names the `--hypervisor`
//! values that pick one. `vm list` names unreachable hypervisors on stderr, not in its table,
//! and still exits 0.
//!
//! Rooms: [`client`] (HTTP, answers read into [`crate::wire`] types), [`progress`] (waiting
//! for a job), [`table`] (printing), [`verbs`] (one file per area). Nothing here imports the
//! daemon.

pub mod client;
pub mod progress;
pub mod table;
pub mod verbs;

use clap::Subcommand;

use crate::cli::client::{Client, ClientError};
use crate::cli::verbs::{backup, export, hypervisor, job, policy, repo, restore, token, vm};

/// Client verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// VMs the hypervisors see: `vm list`.
    Vm {
        #[command(subcommand)]
        cmd: vm::VmCmd,
    },
    /// The cluster's hypervisors: `hypervisor list`.
    Hypervisor {
        #[command(subcommand)]
        cmd: hypervisor::HypervisorCmd,
    },
    /// Back up a VM, or list and show backups.
    ///
    /// `backup VM [--full] [--wait] [--hypervisor NAME]` (also `backup start VM`),
    /// `backup list [VM] [--hypervisor NAME]`, `backup show ID`.
    Backup(backup::BackupArgs),
    /// Verify the repository (or one backup).
    Verify(repo::VerifyArgs),
    /// Apply a retention policy.
    Prune(repo::PruneArgs),
    /// Reclaim the space of removed backups.
    Gc(repo::GcArgs),
    /// Serve a backup over NBD, or list and close exports.
    ///
    /// `export ID [--disk D] [--writable] [--changed-since OTHER]` (also `export open ID`),
    /// `export list`, `export close N`.
    Export(export::ExportArgs),
    /// Restore a backup to a file, as a new domain, or onto its VM.
    ///
    /// One disk to an image file (`restore ID --to PATH [--format F] [--disk D]`), every disk
    /// as a new domain (`restore ID --as-domain NAME`) or onto the VM's own disks
    /// (`restore ID --onto-vm --confirm`). Waits for the job unless `--no-wait`.
    Restore(restore::RestoreArgs),
    /// Jobs: `job list`, `show ID`, `cancel ID`.
    Job {
        #[command(subcommand)]
        cmd: job::JobCmd,
    },
    /// Backup policies: `policy apply FILE`, `list`, `show NAME`, `delete NAME`.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// API tokens: `token create NAME --role R`, `list`, `revoke ID`.
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
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

/// The verb's area runs it.
async fn dispatch(c: &Client, verb: Verb, as_json: bool) -> anyhow::Result<i32> {
    match verb {
        Verb::Vm { cmd } => vm::run(c, cmd, as_json).await,
        Verb::Hypervisor { cmd } => hypervisor::run(c, cmd, as_json).await,
        Verb::Backup(a) => backup::run(c, a, as_json).await,
        Verb::Verify(a) => repo::verify(c, a, as_json).await,
        Verb::Prune(a) => repo::prune(c, a, as_json).await,
        Verb::Gc(a) => repo::gc(c, a, as_json).await,
        Verb::Export(a) => export::run(c, a, as_json).await,
        Verb::Restore(a) => restore::run(c, a, as_json).await,
        Verb::Job { cmd } => job::run(c, cmd, as_json).await,
        Verb::Policy { cmd } => policy::run(c, cmd, as_json).await,
        Verb::Token { cmd } => token::run(c, cmd, as_json).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::verbs::backup::{BackupCmd, StartArgs};
    use super::verbs::export::{ExportCmd, OpenArgs};
    use super::Verb;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        verb: Verb,
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Verb, clap::Error> {
        Cli::try_parse_from([&["sluice"][..], args].concat()).map(|c| c.verb)
    }

    /// The backup `args` start: VM, --full, --wait, --hypervisor.
    fn started(args: &[&str]) -> (String, bool, bool, Option<String>) {
        let s: StartArgs = match parse(args) {
            Ok(Verb::Backup(b)) => match b.cmd {
                None => b.start,
                Some(BackupCmd::Start(s)) => s,
                Some(other) => panic!("{args:?}: {other:?}"),
            },
            other => panic!("{args:?}: {other:?}"),
        };
        (s.vm.unwrap(), s.full, s.wait, s.hypervisor)
    }

    #[test]
    fn backup_vm_is_the_default_and_start_or_dashes_take_any_name() {
        let vm = |n: &str| (n.to_string(), false, false, None);
        assert_eq!(started(&["backup", "web-1"]), vm("web-1"));
        assert_eq!(
            started(&[
                "backup",
                "web-1",
                "--full",
                "--wait",
                "--hypervisor",
                "a",
                "--json"
            ]),
            ("web-1".into(), true, true, Some("a".into()))
        );
        assert_eq!(started(&["backup", "--full", "web-1"]).0, "web-1");
        for name in ["list", "show", "start", "help"] {
            assert_eq!(started(&["backup", "start", name]), vm(name));
            assert_eq!(started(&["backup", "--", name]), vm(name));
        }
        assert_eq!(
            started(&["backup", "start", "list", "--full", "--wait"]),
            ("list".into(), true, true, None)
        );
        assert_eq!(started(&["backup", "--wait", "--", "show"]).0, "show");
        // An option first makes the next word the VM, not a subcommand.
        assert_eq!(
            started(&["backup", "--hypervisor", "a", "list"]),
            ("list".into(), false, false, Some("a".into()))
        );
        for bad in [
            &["backup"][..],
            &["backup", "start"],
            &["backup", "list", "--full"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn backup_list_and_show_are_subcommands() {
        let cmd = |args: &[&str]| match parse(args) {
            Ok(Verb::Backup(b)) => b.cmd,
            other => panic!("{args:?}: {other:?}"),
        };
        assert!(matches!(
            cmd(&["backup", "list"]),
            Some(BackupCmd::List {
                vm: None,
                hypervisor: None
            })
        ));
        assert!(matches!(
            cmd(&["backup", "list", "web-1", "--hypervisor", "a", "--json"]),
            Some(BackupCmd::List { vm: Some(v), hypervisor: Some(h) }) if v == "web-1" && h == "a"
        ));
        assert!(matches!(
            cmd(&["backup", "list", "--hypervisor", "a"]),
            Some(BackupCmd::List {
                vm: None,
                hypervisor: Some(_)
            })
        ));
        assert!(matches!(
            cmd(&["backup", "show", "20261122T073940Z-77d97d12"]),
            Some(BackupCmd::Show { id, hypervisor: None }) if id == "20261122T073940Z-77d97d12"
        ));
        assert!(parse(&["backup", "show"]).is_err());
    }

    #[test]
    fn export_id_is_the_default_beside_open_list_and_close() {
        let export = |args: &[&str]| match parse(args) {
            Ok(Verb::Export(e)) => e,
            other => panic!("{args:?}: {other:?}"),
        };
        let opened = |args: &[&str]| -> OpenArgs {
            let e = export(args);
            match e.cmd {
                None => e.open,
                Some(ExportCmd::Open(o)) => o,
                Some(other) => panic!("{args:?}: {other:?}"),
            }
        };
        let o = opened(&["export", "ID1", "--disk", "vdb", "--writable"]);
        assert_eq!(
            (o.backup.as_deref(), o.disk.as_deref(), o.writable),
            (Some("ID1"), Some("vdb"), true)
        );
        assert_eq!(
            opened(&["export", "open", "ID1"]).backup.as_deref(),
            Some("ID1")
        );
        assert_eq!(
            opened(&["export", "--", "list"]).backup.as_deref(),
            Some("list")
        );
        assert!(matches!(
            export(&["export", "list"]).cmd,
            Some(ExportCmd::List)
        ));
        assert!(matches!(
            export(&["export", "close", "3"]).cmd,
            Some(ExportCmd::Close { id: 3 })
        ));
        assert!(parse(&["export", "close"]).is_err());
        assert!(parse(&["export"]).is_err());
    }
}
