//! Child processes under test: output captured to a log file, killed on drop, log printed when
//! the test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Lines of a process log printed when a test fails.
const LOG_TAIL_LINES: usize = 150;

/// A running child process guard.
#[derive(Debug)]
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `program args`, appending stdout+stderr to `log`.
    pub fn spawn(name: &str, program: &Path, args: Vec<String>, log: PathBuf) -> Self {
        let mut p = Self {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            log,
            child: None,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open process log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
    }

    /// Process id of the current incarnation.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process not running").id()
    }

    /// Whether the process is still running (not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "{} exited unexpectedly ({status}); log:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// How the process ended, if it has. Reaping is fine: the child keeps its status, so this
    /// (and [`Proc::is_running`]) can be asked again and gives the same answer.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Polls until the process exits; panics (with the log) if it still runs `limit` after
    /// `since`. Returns its exit status and when it ended, measured from `since`.
    pub async fn wait_exit(
        &mut self,
        since: Instant,
        limit: Duration,
        what: &str,
    ) -> (ExitStatus, Duration) {
        loop {
            if let Some(status) = self.exit_status() {
                return (status, since.elapsed());
            }
            assert!(
                since.elapsed() < limit,
                "{what}: still running {:?} after the signal (limit {limit:?}); log:\n{}",
                since.elapsed(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again with the same arguments (after [`Proc::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Arguments the process was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}), last {LOG_TAIL_LINES} lines -----\n{}\n----- end of {} log -----",
                self.name,
                self.log.display(),
                self.log_tail(),
                self.name
            );
        }
    }
}
