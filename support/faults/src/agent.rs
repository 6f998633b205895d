//! One of haul's roles running as its own process: spawned with its log in a file, killed with
//! SIGKILL, restarted with the same arguments (and so the same state directories).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A role running as its own process; killed when dropped.
pub struct Agent {
    child: Child,
    bin: PathBuf,
    role: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl Agent {
    /// Run `bin ROLE ARGS`, logging to `dir/ROLE.log`.
    pub fn spawn(bin: &Path, dir: &Path, role: &str, args: &[&str]) -> anyhow::Result<Agent> {
        Agent::spawn_with_env(bin, dir, role, args, &[])
    }

    /// Like `spawn`, with extra environment (kept for restarts).
    pub fn spawn_with_env(
        bin: &Path,
        dir: &Path,
        role: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Agent> {
        let log = dir.join(format!("{role}.log"));
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = start(bin, role, &args, env, &log)?;
        Ok(Agent {
            child,
            bin: bin.to_path_buf(),
            role: role.to_string(),
            args,
            env: env.to_vec(),
            log,
        })
    }

    /// Whether the process has ended on its own (a failpoint, a crash).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL: no chance to flush, drain or say goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the same role again with the same arguments (state directories included).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.child = start(&self.bin, &self.role, &self.args, &self.env, &self.log)?;
        Ok(())
    }

    /// The process id (for reading its memory from /proc, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, in MiB (VmHWM), if the process is alive.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(
    bin: &Path,
    role: &str,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<Child> {
    // Append, so a restarted process's log follows its predecessor's.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    Ok(Command::new(bin)
        .arg(role)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()?)
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "127.0.0.1:0".to_string())
}
