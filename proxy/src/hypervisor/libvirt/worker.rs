//! The dedicated thread that owns the libvirt connection. libvirt calls block (and keep their
//! last error in thread-local storage), so every call is a closure sent to this one thread;
//! async callers await its answer on a oneshot channel and never block a runtime thread.
//!
//! The connection outlives a restart of libvirtd (or of the hypervisor): libvirt's event loop
//! runs on a thread of its own (once per process), so libvirt watches the connection's socket
//! between calls and marks it dead as soon as the peer closes it, and keepalive messages
//! catch a peer that vanished without closing. Before each call the thread checks
//! `virConnectIsAlive` and, when the connection is dead, opens the URI again; a reopen that
//! fails fails that call with the reason, and the next call tries again. Guards holding a
//! clone of the worker (a backup job's end) so reach the hypervisor after a reconnect too.

use std::sync::mpsc;

use tokio::sync::oneshot;
use virt::connect::Connect;

use crate::hypervisor::{failed, Cause, Error, ErrorKind, Result};

/// A call on the libvirt thread: the open connection, or why there is none.
type Job = Box<dyn FnOnce(std::result::Result<&Connect, &Lost>) + Send>;

/// Keepalive: a probe every `INTERVAL` seconds, and the connection is closed after `COUNT`
/// unanswered ones (about 20 s of silence).
const KEEPALIVE_INTERVAL: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// A handle to the libvirt thread; cheap to clone. The thread ends when the last handle goes.
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread and opens `uri` on it.
    pub async fn start(uri: &str) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let uri = uri.to_string();
        std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || run(uri, rx, ready_tx))
            .map_err(|e| crate::hypervisor::io_failed("cannot start the libvirt thread", e))?;
        ready_rx
            .await
            .map_err(|_| failed("libvirt thread ended while connecting"))??;
        Ok(Self { tx })
    }

    /// Runs `f` on the libvirt thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.send(Box::new(move |conn| {
            let _ = reply_tx.send(conn.map_err(Lost::error).and_then(f));
        }))?;
        reply_rx
            .await
            .map_err(|_| failed("libvirt thread dropped a call"))?
    }

    /// Queues `f` without waiting for it (used by guards on drop).
    pub fn fire(&self, f: impl FnOnce(&Connect) + Send + 'static) {
        let job = Box::new(
            move |conn: std::result::Result<&Connect, &Lost>| match conn {
                Ok(c) => f(c),
                Err(lost) => {
                    tracing::error!(error = %catalog::Chain(&lost.error()), "a cleanup call was lost")
                }
            },
        );
        if self.send(job).is_err() {
            tracing::error!("libvirt thread is gone: a cleanup call was lost");
        }
    }

    fn send(&self, job: Job) -> Result<()> {
        self.tx
            .send(job)
            .map_err(|_| failed("libvirt thread is gone"))
    }
}

/// Why the thread has no open connection: it was lost and opening it again failed.
struct Lost {
    uri: String,
    reason: String,
}

impl Lost {
    fn error(&self) -> Error {
        Error::new(
            ErrorKind::Failed,
            format!(
                "libvirt connection to {} lost, and reconnecting failed",
                self.uri
            ),
        )
        .with_source(Cause(self.reason.clone()))
    }
}

fn run(uri: String, rx: mpsc::Receiver<Job>, ready: oneshot::Sender<Result<()>>) {
    virt::error::clear_error_callback();
    start_event_loop();
    let mut conn = match open(&uri) {
        Ok(conn) => conn,
        Err(e) => {
            let err = Error::new(
                crate::hypervisor::ErrorKind::Failed,
                format!("cannot connect to libvirt at {uri}"),
            )
            .with_source(Cause(e.message().to_string()));
            let _ = ready.send(Err(err));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while let Ok(job) = rx.recv() {
        match reopen_if_dead(&uri, &mut conn) {
            Ok(()) => job(Ok(&conn)),
            Err(lost) => job(Err(&lost)),
        }
    }
}

/// Opens `uri` with keepalive (a driver without it, e.g. `test:///`, works without).
fn open(uri: &str) -> std::result::Result<Connect, virt::error::Error> {
    let conn = Connect::open(Some(uri))?;
    if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
        tracing::debug!(
            uri,
            error = e.message(),
            "libvirt connection without keepalive"
        );
    }
    Ok(conn)
}

/// Replaces `conn` with a new connection to `uri` if libvirt closed it (its peer restarted or
/// stopped answering).
fn reopen_if_dead(uri: &str, conn: &mut Connect) -> std::result::Result<(), Lost> {
    // A driver that cannot tell is taken at its word: the call fails if it is dead.
    if conn.is_alive().unwrap_or(true) {
        return Ok(());
    }
    match open(uri) {
        Ok(new) => {
            tracing::warn!(uri, "libvirt connection was lost: reconnected");
            *conn = new;
            Ok(())
        }
        Err(e) => Err(Lost {
            uri: uri.to_string(),
            reason: e.message().to_string(),
        }),
    }
}

/// Runs libvirt's default event loop on a thread of its own, once per process, before the
/// first connection is opened (libvirt watches only the sockets of connections opened after
/// it). Without it a dead connection is noticed only by the call that fails on it.
fn start_event_loop() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(
                error = e.message(),
                "no libvirt event loop: a lost connection is noticed only when a call fails"
            );
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::error!(error = e.message(), "libvirt event loop failed");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event loop thread");
        }
    });
}
