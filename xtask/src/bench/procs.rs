//! Child processes the bench starts (killed and reaped on every path), their output lines with
//! the time each arrived, waiting, and Ctrl-C.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

/// A line of a child's stdout and the wall-clock time it arrived.
pub(super) struct Line {
    pub(super) unix: f64,
    pub(super) text: String,
}

pub(super) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Pids of every process the bench started, for the final check.
pub(super) static SPAWNED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A child process: stdout read line by line on a thread, stderr kept for error messages, stdin
/// held open (churngen exits when it closes). Killed and reaped when dropped, so no error path
/// leaves one behind.
pub(super) struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<Receiver<Line>>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub(super) fn spawn(name: &str, cmd: &mut Command, read_stdout: bool) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(if read_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        SPAWNED.lock().unwrap().push(child.id());
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for text in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx
                        .send(Line {
                            unix: unix_now(),
                            text,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            });
            rx
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut k = keep.lock().unwrap();
                    k.push_str(&String::from_utf8_lossy(&buf[..n]));
                    // Keep the tail only.
                    if k.len() > 8192 {
                        let cut = k.len() - 4096;
                        let cut = (cut..k.len()).find(|&i| k.is_char_boundary(i)).unwrap_or(0);
                        k.drain(..cut);
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().unwrap();
        let s = s.trim();
        if s.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                s.lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        }
    }

    /// The next stdout line, waiting at most `timeout`.
    pub(super) fn line(&self, timeout: Duration) -> Result<Line> {
        let rx = self.lines.as_ref().context("stdout is not read")?;
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => return Ok(l),
                Err(RecvTimeoutError::Disconnected) => {
                    // Let the stderr reader catch up before quoting it.
                    std::thread::sleep(Duration::from_millis(100));
                    bail!("{} ended its output{}", self.name, self.stderr_tail())
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!(
                        "{} printed nothing for {timeout:?}{}",
                        self.name,
                        self.stderr_tail()
                    )
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    pub(super) fn try_line(&self) -> Option<Line> {
        self.lines.as_ref()?.try_recv().ok()
    }

    /// Every line left, until the output ends (bounded wait).
    pub(super) fn drain_lines(&self) -> Vec<Line> {
        let mut v = Vec::new();
        let Some(rx) = self.lines.as_ref() else {
            return v;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            v.push(l);
        }
        v
    }

    pub(super) fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` and closes stdin, waits up to 10 s, then kills. Fails if the process had to
    /// be killed.
    pub(super) fn stop(&mut self, sig: libc::c_int) -> Result<ExitStatus> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill() on our own child's pid, which is not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
        self.stdin.take();
        match self.wait_exit(Duration::from_secs(10)) {
            Ok(st) => Ok(st),
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(e)
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `ok` every 50 ms until it holds.
pub(super) fn wait_until(
    timeout: Duration,
    what: &str,
    mut ok: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// Ctrl-C and SIGTERM: stop at the next check and clean up through the Drop guards.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(super) fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub(super) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
