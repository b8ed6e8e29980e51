//! The host end of the test guest's command channel: a unix socket bound by QEMU to the
//! guest's ttyS1, one line per command, one `ok ...` / `err ...` line per answer.
//!
//! Owns the line protocol and its timeouts. Bytes sent before the guest's agent listens are
//! lost, and the guest's tty may echo a few early lines before the agent puts it in raw mode,
//! so [`Channel::wait_ready`] pings with increasing tags until the latest tag is answered, and
//! every reader skips lines that are neither `ok` nor `err`.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Longest answer line accepted from the guest.
const MAX_LINE: usize = 4096;

/// A connected command channel.
pub struct Channel {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl Channel {
    /// Connects to the socket QEMU listens on, retrying until `limit` (QEMU creates it a
    /// moment after the domain starts).
    pub fn connect(path: &Path, limit: Duration) -> Result<Channel> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return Ok(Channel {
                        stream,
                        pending: Vec::new(),
                    })
                }
                Err(e) if start.elapsed() > limit => {
                    return Err(e).with_context(|| format!("connect to {}", path.display()))
                }
                Err(_) => sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Pings until the guest agent answers the latest ping, or `limit` passes.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let mut tag = 0u64;
        while start.elapsed() < limit {
            tag += 1;
            self.send(&format!("ping {tag}"))?;
            match self.read_answer(Duration::from_millis(700)) {
                Ok(Ok(a)) if a == format!("pong {tag}") => return Ok(()),
                // An older ping answered: the agent is up; wait for the latest one only.
                Ok(Ok(a)) if a.starts_with("pong ") => return self.await_pong(tag, limit),
                Ok(_) | Err(_) => continue,
            }
        }
        bail!("guest agent did not answer a ping within {limit:?}")
    }

    fn await_pong(&mut self, tag: u64, limit: Duration) -> Result<()> {
        let want = format!("pong {tag}");
        loop {
            match self.read_answer(limit)? {
                Ok(a) if a == want => return Ok(()),
                _ => continue,
            }
        }
    }

    /// Sends one command and returns the text after `ok `; an `err` answer is an error.
    pub fn call(&mut self, command: &str, limit: Duration) -> Result<String> {
        self.send(command)?;
        match self.read_answer(limit)? {
            Ok(text) => Ok(text),
            Err(text) => bail!("guest agent refused `{command}`: {text}"),
        }
    }

    fn send(&mut self, command: &str) -> Result<()> {
        if command.contains('\n') {
            bail!("guest command contains a newline: {command:?}");
        }
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .context("write to the guest command channel")
    }

    /// Reads lines until one is `ok ...` (Ok) or `err ...` (Err), within `limit`.
    fn read_answer(&mut self, limit: Duration) -> Result<std::result::Result<String, String>> {
        let deadline = Instant::now() + limit;
        loop {
            let line = self.read_line(deadline)?;
            let line = line.trim_end_matches('\r');
            if let Some(rest) = line.strip_prefix("ok") {
                return Ok(Ok(rest.trim_start().to_string()));
            }
            if let Some(rest) = line.strip_prefix("err") {
                return Ok(Err(rest.trim_start().to_string()));
            }
        }
    }

    fn read_line(&mut self, deadline: Instant) -> Result<String> {
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            if self.pending.len() > MAX_LINE {
                self.pending.clear();
                bail!("guest sent a line longer than {MAX_LINE} bytes");
            }
            self.fill(deadline)?;
        }
    }

    fn fill(&mut self, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for the guest agent");
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut buf = [0u8; 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(anyhow!("guest command channel closed")),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("timed out waiting for the guest agent")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e).context("read from the guest command channel"),
        }
    }
}
