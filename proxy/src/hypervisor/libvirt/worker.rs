//! The dedicated thread that owns the libvirt connection. libvirt calls block (and keep their
//! last error in thread-local storage), so every call is a closure sent to this one thread;
//! async callers await its answer on a oneshot channel and never block a runtime thread.

use std::sync::mpsc;

use tokio::sync::oneshot;
use virt::connect::Connect;

use crate::hypervisor::{failed, Error, Result};

type Job = Box<dyn FnOnce(&Connect) + Send>;

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
            let _ = reply_tx.send(f(conn));
        }))?;
        reply_rx
            .await
            .map_err(|_| failed("libvirt thread dropped a call"))?
    }

    /// Queues `f` without waiting for it (used by guards on drop).
    pub fn fire(&self, f: impl FnOnce(&Connect) + Send + 'static) {
        if self.send(Box::new(f)).is_err() {
            tracing::error!("libvirt thread is gone: a cleanup call was lost");
        }
    }

    fn send(&self, job: Job) -> Result<()> {
        self.tx
            .send(job)
            .map_err(|_| failed("libvirt thread is gone"))
    }
}

fn run(uri: String, rx: mpsc::Receiver<Job>, ready: oneshot::Sender<Result<()>>) {
    virt::error::clear_error_callback();
    let conn = match Connect::open(Some(&uri)) {
        Ok(conn) => conn,
        Err(e) => {
            let err = Error::new(
                crate::hypervisor::ErrorKind::Failed,
                format!("cannot connect to libvirt at {uri}"),
            )
            .with_source(crate::hypervisor::Cause(e.message().to_string()));
            let _ = ready.send(Err(err));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while let Ok(job) = rx.recv() {
        job(&conn);
    }
}
