//! `make demo`: the whole story through the daemon and the CLI, as an operator would run it.
//!
//! Boots a throwaway libvirt VM (the tiny test guest, QEMU TCG), starts `sluice serve` on
//! embedded defaults in a temporary data directory (local repository, SQLite catalog, TLS with
//! a self-signed certificate, NBD over TLS), then drives it only with the `sluice` CLI: vm
//! list, a full backup, guest writes, an incremental, backup list, an NBD export read with
//! `nbdinfo --map`, a restore to qcow2 checked with `qemu-img compare` against what the guest
//! wrote, and verify. Every step prints the command it runs and its output. The daemon, the
//! VM, exports and files are removed at the end, on error, and on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde_json::Value;
use testbed::daemon::Daemon;
use testbed::inspect::compare_images;
use testbed::peers::run;
use testbed::{teardown_domain, Model, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// What a signal must tear down: the daemon, the VM, the files.
#[derive(Default)]
struct Leftovers {
    daemon: Option<u32>,
    vm: Option<String>,
    dirs: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    daemon: None,
    vm: None,
    dirs: Vec::new(),
});

fn leftovers() -> std::sync::MutexGuard<'static, Leftovers> {
    LEFTOVERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The signal that asked the demo to stop (0: none yet).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// On SIGINT or SIGTERM, a watcher thread tears everything down and exits with 130.
/// (Handlers are reset at exec, so the daemon and tools keep their own signal handling.)
fn on_signal_clean_up() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(note_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    std::thread::spawn(|| loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            clean_up_and_exit(sig);
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    Ok(())
}

fn clean_up_and_exit(sig: i32) -> ! {
    let name = Signal::try_from(sig).map_or("signal", Signal::as_str);
    eprintln!("\n{name}: stopping the daemon and removing the demo VM and files");
    let l = std::mem::take(&mut *leftovers());
    if let Some(pid) = l.daemon {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        while nix::sys::signal::kill(pid, None).is_ok() && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
    if let Some(vm) = l.vm {
        teardown_domain(&vm);
    }
    for d in l.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    eprintln!("cleaned up");
    std::process::exit(130);
}

fn main() -> Result<()> {
    on_signal_clean_up()?;
    let start = Instant::now();
    let r = story(start);
    if SIGNALLED.load(Ordering::SeqCst) != 0 {
        // The watcher is cleaning up and will exit.
        loop {
            std::thread::park();
        }
    }
    // Dropping the daemon and the VM (inside `story`) already cleaned up; forget them.
    *leftovers() = Leftovers::default();
    match &r {
        Ok(()) => println!("\ndone in {:.1} s", start.elapsed().as_secs_f64()),
        Err(e) => eprintln!("\ndemo failed: {e:#}"),
    }
    r
}

fn story(start: Instant) -> Result<()> {
    println!("sluice demo: agentless changed-block backup of a libvirt VM, driven through `sluice serve` and the `sluice` CLI\n");
    let vm = TestVm::boot(VmSpec::new("demo").disk(64 * MIB))?;
    leftovers().vm = Some(vm.name().to_string());
    leftovers().dirs.push(vm.scratch().to_path_buf());
    println!(
        "booted throwaway domain {} (64 MiB disk vda) in {:.1} s",
        vm.name(),
        start.elapsed().as_secs_f64()
    );
    let dir = tempfile::Builder::new().prefix("sluice-demo-").tempdir()?;
    leftovers().dirs.push(dir.path().to_path_buf());
    let d = Daemon::start(dir.path(), "")?;
    leftovers().daemon = Some(d.pid());
    println!(
        "started `sluice serve` (pid {}) on {}, data in {}",
        d.pid(),
        d.url,
        d.data.display()
    );
    println!("  the CLI finds it through SLUICE_URL, SLUICE_TOKEN (the first admin token, {}/admin.token) and SLUICE_FINGERPRINT (the pinned certificate)", d.data.display());
    Demo { vm, d, dir }.run()
}

struct Demo {
    vm: TestVm,
    d: Daemon,
    dir: tempfile::TempDir,
}

impl Demo {
    fn run(self) -> Result<()> {
        let vm = self.vm.name().to_string();
        self.sluice(&["vm", "list"])?;
        let mut model = Model::new(&self.vm);
        self.guest_writes(&mut model, &[(0, 8 * MIB, 1), (40 * MIB, 4 * MIB, 2)])?;
        self.sluice(&["backup", &vm, "--full", "--wait"])?;
        let full = self.latest()?;
        self.guest_writes(
            &mut model,
            &[(4 * KIB, 4 * KIB, 11), (41 * MIB, 128 * KIB, 12)],
        )?;
        // Retention orders backups by their start second: start the incremental later.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        self.sluice(&["backup", &vm, "--wait"])?;
        let incr = self.latest()?;
        ensure!(incr != full, "the incremental made no new backup");
        self.sluice(&["backup", "list", &vm])?;
        self.show_read(&full, "full")?;
        self.show_read(&incr, "incremental")?;
        self.export(&incr)?;
        self.restore(&incr, &model)?;
        self.sluice(&["job", "list"])?;
        self.sluice(&["verify", "--full"])?;
        drop(self.d);
        println!("\nstopped the daemon; removing domain {vm}, its checkpoints and every demo file");
        Ok(())
    }

    /// Prints and runs `sluice ARGS` (tables, progress bars), failing on a non-zero exit.
    fn sluice(&self, args: &[&str]) -> Result<()> {
        println!("\n$ sluice {}", args.join(" "));
        let status = self.d.command(args)?.status()?;
        ensure!(
            status.success(),
            "sluice {} failed: {status}",
            args.join(" ")
        );
        Ok(())
    }

    fn guest_writes(&self, model: &mut Model, writes: &[(u64, u64, u64)]) -> Result<()> {
        println!("\nguest writes (inside the VM, through its own block layer):");
        for &(off, len, seed) in writes {
            model.write(&self.vm, "vda", off, len, seed)?;
            println!("  vda: {} KiB at offset {} KiB", len / KIB, off / KIB);
        }
        self.vm.sync()
    }

    /// The id of the newest backup of the VM.
    fn latest(&self) -> Result<String> {
        let list = self.d.ok(&["backup", "list", self.vm.name()])?;
        list.as_array()
            .and_then(|a| a.first())
            .and_then(|b| b["id"].as_str())
            .map(str::to_string)
            .context("no backup listed")
    }

    /// What the job of `id` read from the hypervisor against what the disk holds.
    fn show_read(&self, id: &str, what: &str) -> Result<()> {
        let jobs = self.d.ok(&["job", "list"])?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["backup_id"] == id))
            .context("backup job")?;
        let p = &job["progress"];
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        println!(
            "{what} backup {id}: read {} KiB from the hypervisor, stored {} KiB new, {} KiB deduplicated, {} KiB zero",
            n("bytes_read") / KIB,
            n("bytes_new") / KIB,
            n("bytes_dedup") / KIB,
            n("bytes_zero") / KIB
        );
        Ok(())
    }

    fn export(&self, id: &str) -> Result<()> {
        println!("\n$ sluice export {id}");
        let export: Value = self.d.ok(&["export", id])?;
        let uri = export["uri"].as_str().context("export uri")?;
        println!("export {}: {uri}", export["id"]);
        println!("\n$ nbdinfo --map '{uri}'");
        let map = run("nbdinfo", &["--map", uri])?;
        print!("{map}");
        self.sluice(&["export", "close", &export["id"].to_string()])
    }

    fn restore(&self, id: &str, model: &Model) -> Result<()> {
        let q = self.d.data.join("restores").join("demo-vda.qcow2");
        let q = q.to_str().context("restore path")?;
        self.sluice(&["restore", id, "--to", q, "--format", "qcow2"])?;
        let want = self.dir.path().join("guest-wrote.raw");
        std::fs::write(&want, model.disk("vda")?)?;
        let want = want.to_str().context("path")?;
        println!("\n$ qemu-img compare -f qcow2 -F raw {q} <what the guest wrote>");
        compare_images(q, "qcow2", want, "raw")?;
        println!("Images are identical.");
        Ok(())
    }
}
