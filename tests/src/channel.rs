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
    /// Last ping tag sent.
    tag: u64,
    /// A command's answer may still be on its way (its wait timed out): resynchronise
    /// before the next command, or its answer would be taken for the next one's.
    dirty: bool,
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
                        tag: 0,
                        dirty: false,
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
        while start.elapsed() < limit {
            self.tag += 1;
            let tag = self.tag;
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

    /// Reads answers until `pong TAG`, dropping everything before it.
    fn await_pong(&mut self, tag: u64, limit: Duration) -> Result<()> {
        let want = format!("pong {tag}");
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_answer(left)? {
                Ok(a) if a == want => return Ok(()),
                _ => continue,
            }
        }
    }

    /// Drops late answers of a command whose wait timed out.
    fn resync(&mut self) -> Result<()> {
        self.tag += 1;
        let tag = self.tag;
        self.send(&format!("ping {tag}"))?;
        self.await_pong(tag, Duration::from_secs(300))
            .context("guest agent did not come back after a timed-out command")?;
        self.dirty = false;
        Ok(())
    }

    /// Sends one command and returns the text after `ok `; an `err` answer is an error.
    pub fn call(&mut self, command: &str, limit: Duration) -> Result<String> {
        if self.dirty {
            self.resync()?;
        }
        self.send(command)?;
        let answer = self.read_answer(limit);
        self.dirty = answer.is_err();
        match answer? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A stand-in for the guest agent on a unix socket: echoes a junk line first (as the
    /// guest's tty does before the agent sets raw mode) and answers `write` late.
    fn fake_guest(listener: UnixListener) {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        out.write_all(b"ping 0\r\n").unwrap();
        for line in BufReader::new(stream).lines() {
            let line = line.unwrap();
            let answer = match line.split(' ').next().unwrap() {
                "ping" => format!("ok pong {}", &line[5..]),
                "write" => {
                    sleep(Duration::from_millis(300));
                    "ok wrote 512".to_string()
                }
                "sum" => "ok abc".to_string(),
                _ => "err unknown command".to_string(),
            };
            out.write_all(format!("{answer}\n").as_bytes()).unwrap();
        }
    }

    #[test]
    fn late_answers_are_not_taken_for_the_next_command() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path)?;
        std::thread::spawn(move || fake_guest(listener));
        let mut ch = Channel::connect(&path, Duration::from_secs(5))?;
        ch.wait_ready(Duration::from_secs(5))?;
        assert!(ch
            .call("write vda 0 512 1", Duration::from_millis(50))
            .is_err());
        assert_eq!(ch.call("sum vda 0 512", Duration::from_secs(5))?, "abc");
        let err = ch.call("bogus", Duration::from_secs(5)).unwrap_err();
        assert!(format!("{err}").contains("unknown command"), "{err}");
        Ok(())
    }
}
