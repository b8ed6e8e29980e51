//! `export`: serve a backup disk over NBD (`export ID`, or explicitly `export open ID`;
//! `--changed-since OTHER` adds the diff context against another backup), list the open
//! exports (`export list`), close one (`export close N`).
//!
//! `export ID` is the default form, like `backup VM`: a first word that is not a subcommand
//! is the backup id (`export -- ID` or `export open ID` always are).

use clap::{Args, Subcommand};

use crate::cli::client::Client;
use crate::cli::table::show;
use crate::wire::exports::{ExportInfo, OpenExport};

/// `export ID` (the default), or a subcommand.
#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    subcommand_value_name = "COMMAND",
    override_usage = "sluice export [OPTIONS] <ID>\n       sluice export <COMMAND>",
    after_help = "`sluice export ID` is `sluice export open ID`."
)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub cmd: Option<ExportCmd>,
    #[command(flatten)]
    pub open: OpenArgs,
}

#[derive(Subcommand, Debug)]
pub enum ExportCmd {
    /// Serve a backup disk over NBD (what `export ID` does).
    Open(OpenArgs),
    /// The open exports.
    List,
    /// Close an export (a writable one's overlay is dropped).
    Close {
        /// Export number (`export list` shows them).
        id: u64,
    },
}

/// What to export.
#[derive(Args, Debug)]
pub struct OpenArgs {
    /// Backup id.
    #[arg(value_name = "ID", required = true)]
    pub backup: Option<String>,
    /// Disk target (default: the backup's first disk).
    #[arg(long)]
    pub disk: Option<String>,
    /// Accept writes into a copy-on-write overlay (dropped at close).
    #[arg(long)]
    pub writable: bool,
    /// Also offer the meta context `sluice:changed-since:OTHER`: the chunks that differ from
    /// backup OTHER (same VM and disk, older or newer), for `nbdinfo --map=CONTEXT URI`.
    #[arg(long, value_name = "OTHER")]
    pub changed_since: Option<String>,
}

/// Runs an `export` verb.
pub async fn run(c: &Client, args: ExportArgs, as_json: bool) -> anyhow::Result<i32> {
    match args.cmd {
        None => open(c, args.open, as_json).await,
        Some(ExportCmd::Open(o)) => open(c, o, as_json).await,
        Some(ExportCmd::List) => {
            let v = c.get::<Vec<ExportInfo>>("/exports").await?;
            show(&v, as_json, |l| table(l));
            Ok(0)
        }
        Some(ExportCmd::Close { id }) => {
            c.delete(&format!("/exports/{id}")).await?;
            println!("export {id} closed");
            Ok(0)
        }
    }
}

async fn open(c: &Client, o: OpenArgs, as_json: bool) -> anyhow::Result<i32> {
    let req = OpenExport {
        backup: o.backup.unwrap_or_default(),
        disk: o.disk,
        writable: o.writable,
        changed_since: o.changed_since,
    };
    let v = c.post::<ExportInfo>("/exports", &req).await?;
    show(&v, as_json, export_line);
    Ok(0)
}

fn mode(writable: bool) -> &'static str {
    if writable {
        "writable"
    } else {
        "read-only"
    }
}

fn export_line(e: &ExportInfo) {
    let mode = if e.writable {
        "writable (writes go to an overlay, dropped at close)"
    } else {
        "read-only"
    };
    println!("export {} ({mode}): {}", e.id, e.uri);
    if let (Some(ctx), Some(other)) = (&e.meta_context, &e.changed_since) {
        println!("  meta context {ctx}: bit 0 marks the chunks that differ from backup {other}");
        println!("  nbdinfo --map={ctx} '{}'", e.uri);
    }
    if let Some(hint) = qemu_hint(&e.uri) {
        println!("  qemu-img/qemu: {hint}");
    }
}

fn table(list: &[ExportInfo]) {
    println!(
        "{:>4} {:<9} {:<48} {:<27} URI",
        "ID", "MODE", "NAME", "CHANGED SINCE"
    );
    for e in list {
        println!(
            "{:>4} {:<9} {:<48} {:<27} {}",
            e.id,
            mode(e.writable),
            e.name,
            e.changed_since.as_deref().unwrap_or("-"),
            e.uri
        );
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

#[cfg(test)]
mod tests {
    use super::{qemu_hint, ExportArgs, ExportCmd};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        export: ExportArgs,
    }

    #[test]
    fn changed_since_is_an_option_of_export_id_and_export_open() {
        let args = Cli::try_parse_from(["export", "B2", "--changed-since", "B1", "--disk", "vdb"])
            .unwrap()
            .export;
        assert!(args.cmd.is_none());
        assert_eq!(args.open.backup.as_deref(), Some("B2"));
        assert_eq!(args.open.changed_since.as_deref(), Some("B1"));
        assert_eq!(args.open.disk.as_deref(), Some("vdb"));
        let args = Cli::try_parse_from(["export", "open", "B2", "--changed-since=B1"])
            .unwrap()
            .export;
        match args.cmd {
            Some(ExportCmd::Open(o)) => assert_eq!(o.changed_since.as_deref(), Some("B1")),
            other => panic!("export open parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["export", "B2", "--changed-since"]).is_err());
    }

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
