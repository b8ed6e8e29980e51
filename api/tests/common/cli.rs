//! Runs the built `sluice` binary against an API served on loopback, for the CLI tests.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::net::TcpListener;

/// What one run of the binary gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The table rows (header excluded), split on whitespace.
    pub fn rows(&self) -> Vec<Vec<&str>> {
        self.stdout
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect()
    }

    /// The first line starting with `label`, without it, trimmed.
    pub fn field(&self, label: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label:?} line: {self:?}"))
            .trim()
    }
}

/// The `sluice` binary pointed at a daemon on loopback with a token.
pub struct Cli {
    pub addr: SocketAddr,
    pub token: String,
}

impl Cli {
    /// `sluice --url … --token … ARGS`: the global options first, so `ARGS` may hold `--`.
    pub async fn run(&self, args: &[&str]) -> Run {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--url", &format!("http://{}", self.addr), "--token"])
            .arg(&self.token)
            .args(args)
            .env_remove("SLUICE_URL")
            .env_remove("SLUICE_TOKEN")
            .env_remove("SLUICE_FINGERPRINT")
            .output()
            .await
            .expect("running sluice");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    pub async fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args).await;
        assert_eq!(r.code, 0, "sluice {args:?}: {r:?}");
        r
    }
}

/// Serves `app` on loopback; the server task ends with the test's runtime.
pub async fn serve(app: axum::Router, token: &str) -> Cli {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Cli {
        addr,
        token: token.to_string(),
    }
}
