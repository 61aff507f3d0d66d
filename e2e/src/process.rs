//! Real `updraft-agent` and `updraft-dispatcher` processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The directory holding the workspace's built binaries (next to the running test's `deps`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// A workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --bins` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// A child process with its log file.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
}

impl Proc {
    /// Spawns `binary` with `args`, logging to `log`.
    pub fn spawn(binary: &Path, args: Vec<String>, log: PathBuf) -> std::io::Result<Proc> {
        let mut p = Proc {
            child: None,
            log,
            binary: binary.to_path_buf(),
            args,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> std::io::Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let err = out.try_clone()?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env(
                "UPDRAFT_LOG",
                std::env::var("UPDRAFT_TEST_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("UPDRAFT_LOG_FORMAT", "pretty")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts it again with the same arguments (after a kill).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill9();
        self.start()
    }

    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (the process freezes: no heartbeats, no I/O).
    pub fn stop(&self) {
        if let Some(p) = self.pid() {
            let _ = kill(p, Signal::SIGSTOP);
        }
    }

    /// SIGCONT.
    pub fn cont(&self) {
        if let Some(p) = self.pid() {
            let _ = kill(p, Signal::SIGCONT);
        }
    }

    /// SIGTERM and wait up to `within` for a clean exit; true when it exited by itself.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(p) = self.pid() else { return true };
        let _ = kill(p, Signal::SIGTERM);
        let deadline = std::time::SystemTime::now() + within;
        while std::time::SystemTime::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }

    /// True while running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.cont();
        self.kill9();
    }
}
