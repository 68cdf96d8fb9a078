//! Instances of this very binary started as child processes on this machine: what
//! `parley demo` and `parley bench` run. Each listens on 127.0.0.1 and is killed when its
//! handle is dropped.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncBufReadExt;

pub struct LocalInstance {
    pub child: tokio::process::Child,
    /// host:port it listens on.
    pub addr: String,
    pub id: String,
}

impl LocalInstance {
    /// Runs `parley serve` on `data` (shared by instances that form one cluster) and waits
    /// for the line that names its address.
    pub async fn start(data: &Path, config: Option<&Path>, listen: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command.args(["serve", "--listen", listen, "--data"]).arg(data);
        if let Some(c) = config {
            command.arg("--config").arg(c);
        }
        command.env("PARLEY_LOG", std::env::var("PARLEY_LOG").unwrap_or_else(|_| "warn".into()));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.stdout(Stdio::piped()).kill_on_drop(true).spawn().context("starting parley serve")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        while let Some(line) = lines.next_line().await? {
            // "parley: instance ID listening on http://ADDR"
            if let Some(addr) = line.split("listening on http://").nth(1) {
                let id = line.split_whitespace().nth(2).unwrap_or_default().to_string();
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok(Self { child, addr: addr.trim().to_string(), id });
            }
        }
        bail!("parley serve exited before listening")
    }

    /// SIGKILL, as `kill -9` would; returns once the process is gone.
    pub async fn kill9(mut self) {
        let _ = self.child.kill().await;
    }
}
