//! tcptrace on a second, older kernel: Debian's 6.1 (`linux-image-6.1.0-N-amd64`), booted under
//! QEMU with software emulation (TCG), with an initramfs this test writes itself.
//!
//! The initramfs holds busybox, tcptrace, the `scenario` helper, the shared libraries `ldd`
//! names for them, and `tests/qemu/init.sh` as `/init`. That script starts
//! `tcptrace watch --json`, makes a CLOSE_WAIT leak of 3 sockets plus 2 refused connects,
//! and prints everything on the serial console as `@@ ...` lines, then powers off. The test
//! checks, from the console: the guest ran 6.1, tcptrace exited 0 without an error line, and its
//! JSON shows the leak server's pid with `close_wait.count == 3` and `leaked == 3` (the guest's
//! /proc/net/tcp is the independent oracle), the clients' 3 good connects and the 2 refusals.
//!
//! Needs root (as the other privileged tests): without it, it prints SKIP and passes. As root it
//! never skips: a missing tool fails the test with the Debian package that provides it.
//! The kernel package and its vmlinuz are cached in `target/qemu-cache` (downloaded once with
//! `apt-get download`); `TCPTRACE_QEMU_KERNEL=/path/to/vmlinuz` boots another kernel instead.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tcptrace_tests::{failed, process, require_root, tcptrace_bin, u64_at};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");
const INIT: &str = include_str!("../qemu/init.sh");
/// Everything QEMU may take, boot to power-off (a run takes about 15 s).
const QEMU_TIMEOUT: Duration = Duration::from_secs(240);
/// Sockets leaked by the leak server in the guest (`K` in init.sh).
const LEAKED: u64 = 3;
/// Connects refused in the guest (`--count` of `scenario refused` in init.sh).
const REFUSED: u64 = 2;
/// The kernel series under test: `linux-image-<SERIES>-<abi>-amd64`.
const SERIES: &str = "6.1.0";

#[test]
fn tcptrace_reports_a_leak_on_debian_6_1_under_qemu() {
    require_root!("tcptrace_reports_a_leak_on_debian_6_1_under_qemu");
    let started = Instant::now();
    let qemu = tool("qemu-system-x86_64", "qemu-system-x86");
    let busybox = tool("busybox", "busybox-static");
    let kernel = kernel_image();
    let work = WorkDir::new();
    let initrd = work.0.join("initrd.cpio");
    build_initrd(&initrd, &busybox);
    let prepared = started.elapsed();

    // A guest that never reached its init (no `@@` line: TCG stuck in the firmware or the
    // kernel's start, seen once in a few dozen boots) is booted once more; a guest whose init
    // ran and then hung is a failure at once.
    let console = match boot(&qemu, &kernel, &initrd) {
        Ok(console) => console,
        Err(TimedOut {
            report,
            reached_init,
        }) if !reached_init => {
            eprintln!(
                "old_kernel: the guest never reached its init; booting it once more. The first \
                 attempt:\n{report}"
            );
            boot(&qemu, &kernel, &initrd).unwrap_or_else(|t| panic!("{}", t.report))
        }
        Err(t) => panic!("{}", t.report),
    };
    let booted = started.elapsed() - prepared;
    let guest = Guest::parse(&console);
    guest.check();
    println!(
        "old_kernel: Linux {} under QEMU: pid {} leaked {LEAKED} CLOSE_WAIT sockets, seen by \
         tcptrace in {} snapshots (prepare {prepared:.1?}, QEMU {booted:.1?})",
        guest.uname,
        guest.server,
        guest.snapshots.len()
    );
}

// ---------------------------------------------------------------------------------------------
// What the guest printed

/// The `@@` lines of the serial console, sorted by kind.
struct Guest {
    console: String,
    uname: String,
    server: u32,
    clients: u32,
    refused: u32,
    oracle: Option<u64>,
    exit: Option<i32>,
    snapshots: Vec<Value>,
    garbled: Vec<String>,
    stderr: Vec<String>,
    fails: Vec<String>,
    done: bool,
}

impl Guest {
    fn parse(console: &str) -> Guest {
        let mut g = Guest {
            console: console.to_string(),
            uname: String::new(),
            server: 0,
            clients: 0,
            refused: 0,
            oracle: None,
            exit: None,
            snapshots: Vec::new(),
            garbled: Vec::new(),
            stderr: Vec::new(),
            fails: Vec::new(),
            done: false,
        };
        for raw in console.lines() {
            // Firmware escape sequences may precede a marker on the same line.
            let Some(at) = raw.find("@@ ") else { continue };
            let line = raw[at + 3..].trim_end();
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            let pid = || rest.trim().parse::<u32>().unwrap_or(0);
            match kind {
                "uname" => g.uname = rest.to_string(),
                "server-pid" => g.server = pid(),
                "clients-pid" => g.clients = pid(),
                "refused-pid" => g.refused = pid(),
                "oracle-close-wait" => g.oracle = rest.trim().parse().ok(),
                "tcptrace-exit" => g.exit = rest.trim().parse().ok(),
                "json" => match serde_json::from_str::<Value>(rest) {
                    Ok(v) => g.snapshots.push(v),
                    // A kernel message may have cut into the line; kept for the report.
                    Err(_) => g.garbled.push(rest.to_string()),
                },
                "stderr" => g.stderr.push(rest.to_string()),
                "fail" => g.fails.push(rest.to_string()),
                "done" => g.done = true,
                _ => {}
            }
        }
        g
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "old kernel (Linux {:?}): {what}\n--- guest markers ---\n{}\n--- serial console \
             (tail) ---\n{}",
            self.uname,
            self.markers(),
            tail(&self.console, 12_000)
        );
    }

    /// The `@@` lines other than JSON, for failure messages.
    fn markers(&self) -> String {
        self.console
            .lines()
            .filter_map(|l| l.find("@@ ").map(|at| l[at..].trim_end()))
            .filter(|l| !l.starts_with("@@ json "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check(&self) {
        if !self.done {
            self.fail("the guest's /init did not finish (no `@@ done`)");
        }
        if !self.fails.is_empty() {
            self.fail(&format!("steps of /init failed: {:?}", self.fails));
        }
        if !self.uname.starts_with("6.1.") && std::env::var_os("TCPTRACE_QEMU_KERNEL").is_none() {
            self.fail("the guest does not run a 6.1 kernel");
        }
        let errors: Vec<&String> = self
            .stderr
            .iter()
            .filter(|l| l.to_ascii_lowercase().contains("error"))
            .collect();
        if self.exit != Some(0) || !errors.is_empty() {
            self.fail(&format!(
                "tcptrace did not run cleanly: exit status {:?}, stderr:\n{}",
                self.exit,
                self.stderr.join("\n")
            ));
        }
        if !self.stderr.is_empty() {
            println!(
                "old_kernel: tcptrace stderr on {}:\n{}",
                self.uname,
                self.stderr.join("\n")
            );
        }
        if self.snapshots.is_empty() {
            self.fail("tcptrace printed no JSON snapshot");
        }
        if !self.garbled.is_empty() {
            println!(
                "old_kernel: {} console line(s) after `@@ json` were not JSON (kernel messages?)",
                self.garbled.len()
            );
        }
        if self.server == 0 || self.clients == 0 || self.refused == 0 {
            self.fail("the guest did not report the scenario pids");
        }
        if self.oracle != Some(LEAKED) {
            self.fail(&format!(
                "oracle: /proc/net/tcp shows {:?} CLOSE_WAIT sockets of the leak server, \
                 expected {LEAKED} (the scenario itself went wrong)",
                self.oracle
            ));
        }

        let srv = self.server;
        let entry = |v: &Value| process(v, srv).cloned();
        for v in &self.snapshots {
            if let Some(n) = entry(v).and_then(|p| u64_at(&p, "close_wait.count"))
                && n > LEAKED
            {
                self.fail(&format!(
                    "pid {srv}: close_wait.count {n} > {LEAKED} in a snapshot:\n{v}"
                ));
            }
        }
        let leak = |p: &Value| {
            u64_at(p, "close_wait.count") == Some(LEAKED)
                && u64_at(p, "close_wait.leaked") == Some(LEAKED)
        };
        if !self.snapshots.iter().filter_map(entry).any(|p| leak(&p)) {
            self.fail(&format!(
                "no snapshot shows pid {srv} with close_wait.count == {LEAKED} and \
                 leaked == {LEAKED}; last snapshot:\n{}",
                self.snapshots.last().unwrap()
            ));
        }

        // The last snapshot holds the final word on every process of the scenario.
        let last = self.snapshots.last().unwrap();
        let find = |pid: u32, who: &str| match process(last, pid) {
            Some(p) => p.clone(),
            None => self.fail(&format!(
                "{who} (pid {pid}) is missing from the last snapshot:\n{last}"
            )),
        };
        let server = find(srv, "the leak server");
        if !leak(&server) || server.get("comm").and_then(Value::as_str) != Some("scenario") {
            self.fail(&format!(
                "last snapshot: expected pid {srv} comm \"scenario\" with close_wait.count and \
                 leaked {LEAKED}, got {server}"
            ));
        }
        let clients = find(self.clients, "the clients");
        if u64_at(&clients, "connects.ok") != Some(LEAKED) {
            self.fail(&format!(
                "last snapshot: expected connects.ok == {LEAKED} for the clients, got {clients}"
            ));
        }
        let refused = find(self.refused, "the refused connector");
        if failed(&refused, "connects.failed", "ECONNREFUSED") != Some(REFUSED) {
            self.fail(&format!(
                "last snapshot: expected connects.failed.ECONNREFUSED == {REFUSED}, got {refused}"
            ));
        }
        if u64_at(last, "dropped_events") != Some(0) {
            self.fail(&format!("last snapshot: dropped_events is not 0: {last}"));
        }
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    &s[cut..]
}

// ---------------------------------------------------------------------------------------------
// QEMU

/// QEMU, killed and reaped if the test ends (or panics) before it powers off.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Copies a pipe into a shared string until EOF.
fn drain(mut from: impl Read + Send + 'static) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (text, handle)
}

/// A boot that did not power off within [`QEMU_TIMEOUT`].
struct TimedOut {
    /// What happened, with the tails of the console and of QEMU's stderr.
    report: String,
    /// The guest's init printed at least one `@@` line.
    reached_init: bool,
}

/// Boots `kernel` with `initrd` and returns the serial console once the guest powered off.
fn boot(qemu: &Path, kernel: &Path, initrd: &Path) -> Result<String, TimedOut> {
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", qemu.display()));
    let (console, out) = drain(child.stdout.take().unwrap());
    let (errors, err) = drain(child.stderr.take().unwrap());
    let mut vm = Vm(child);
    let end = Instant::now() + QEMU_TIMEOUT;
    let status = loop {
        if let Some(st) = vm.0.try_wait().expect("wait for QEMU") {
            break st;
        }
        if Instant::now() >= end {
            drop(vm);
            let console = console.lock().unwrap();
            return Err(TimedOut {
                report: format!(
                    "QEMU did not power off within {QEMU_TIMEOUT:?}; killed it.\n--- serial \
                     console (tail) ---\n{}\n--- QEMU stderr ---\n{}",
                    tail(&console, 12_000),
                    errors.lock().unwrap()
                ),
                reached_init: console.contains("@@"),
            });
        }
        thread::sleep(Duration::from_millis(100));
    };
    let _ = out.join();
    let _ = err.join();
    let console = console.lock().unwrap().clone();
    if !status.success() {
        panic!(
            "QEMU failed ({status}):\n{}\n--- serial console (tail) ---\n{}",
            errors.lock().unwrap(),
            tail(&console, 12_000)
        );
    }
    Ok(console)
}

// ---------------------------------------------------------------------------------------------
// Tools and the kernel image

/// Finds `name` on PATH (or in the usual directories); fails naming the Debian package.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package {package} (apt-get install {package})");
}

/// Runs a command and returns its stdout; fails with its stderr (and the package) otherwise.
fn output(cmd: &mut Command, package: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (Debian package {package})"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/qemu-cache")
}

/// The ABI number N of `<prefix>6.1.0-N-amd64<suffix>`.
fn abi_of(name: &str, prefix: &str, suffix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .strip_prefix(SERIES)?
        .strip_prefix('-')?
        .strip_suffix("-amd64")?
        .parse()
        .ok()
}

/// The vmlinuz to boot: `$TCPTRACE_QEMU_KERNEL`, else the newest one in the cache, else the
/// newest `linux-image-6.1.0-N-amd64` that apt knows, downloaded and unpacked into the cache.
fn kernel_image() -> PathBuf {
    if let Some(p) = std::env::var_os("TCPTRACE_QEMU_KERNEL") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "TCPTRACE_QEMU_KERNEL={} is not a file",
            p.display()
        );
        return p;
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("mkdir {}: {e}", cache.display()));
    let cached = fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((abi_of(&name, "vmlinuz-", "")?, e.path()))
        })
        .max();
    if let Some((_, path)) = cached {
        return path;
    }

    let apt_cache = tool("apt-cache", "apt");
    let listing = output(
        Command::new(apt_cache).args([
            "search",
            "--names-only",
            &format!("^linux-image-{}-[0-9]+-amd64$", SERIES.replace('.', "\\.")),
        ]),
        "apt",
    );
    let Some(abi) = listing
        .lines()
        .filter_map(|l| abi_of(l.split_whitespace().next()?, "linux-image-", ""))
        .max()
    else {
        panic!(
            "apt knows no linux-image-{SERIES}-N-amd64 package: run `apt-get update` on a \
             Debian 12 (bookworm) machine"
        );
    };
    let release = format!("{SERIES}-{abi}-amd64");
    let package = format!("linux-image-{release}");
    println!("old_kernel: downloading {package} into {}", cache.display());

    // Download into a private directory, then move into place: concurrent runs never see a
    // half-written file.
    let part = cache.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&part);
    fs::create_dir_all(&part).unwrap();
    output(
        Command::new(tool("apt-get", "apt"))
            .args(["-q", "download", &package])
            .current_dir(&part),
        "apt",
    );
    let deb = fs::read_dir(&part)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| {
            panic!(
                "apt-get download {package} left no .deb in {}",
                part.display()
            )
        });

    let vmlinuz = part.join(format!("vmlinuz-{release}"));
    let mut unpack = Command::new(tool("dpkg-deb", "dpkg"))
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn dpkg-deb");
    let extracted = Command::new(tool("tar", "tar"))
        .args(["-xO", "-f", "-"])
        .arg(format!("./boot/vmlinuz-{release}"))
        .stdin(unpack.stdout.take().unwrap())
        .stdout(File::create(&vmlinuz).unwrap())
        .status()
        .expect("run tar");
    let unpacked = unpack.wait().expect("wait for dpkg-deb");
    assert!(
        unpacked.success() && extracted.success(),
        "extracting boot/vmlinuz-{release} from {}: dpkg-deb {unpacked}, tar {extracted}",
        deb.display()
    );
    assert!(
        fs::metadata(&vmlinuz).unwrap().len() > 1 << 20,
        "{} is too small",
        vmlinuz.display()
    );

    fs::rename(&deb, cache.join(deb.file_name().unwrap())).unwrap();
    let dest = cache.join(vmlinuz.file_name().unwrap());
    fs::rename(&vmlinuz, &dest).unwrap();
    let _ = fs::remove_dir_all(&part);
    dest
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// A temporary directory removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> WorkDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "tcptrace-old-kernel-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        WorkDir(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes an uncompressed cpio archive in the "newc" format that the kernel unpacks as its
/// initramfs. (Uncompressed boots faster under TCG than gzip, and needs no tool.)
struct Newc {
    out: BufWriter<File>,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Newc {
    fn create(path: &Path) -> Newc {
        let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Newc {
            out: BufWriter::new(file),
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }

    /// One header and name; the caller writes `size` bytes of data after it.
    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let size = u32::try_from(size).expect("initramfs member over 4 GiB");
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = String::from("070701");
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// Every missing parent directory of `name`.
    fn parents(&mut self, name: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let dir = prefix.clone();
                self.header(&dir, S_IFDIR | 0o755, 0, (0, 0))?;
            }
        }
        Ok(())
    }

    fn dir(&mut self, name: &str) -> io::Result<()> {
        self.parents(&format!("{name}/x"))
    }

    fn bytes(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.parents(name)?;
        self.header(name, S_IFREG | mode, data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    /// Copies a host file (following symlinks) to `name`.
    fn file(&mut self, name: &str, mode: u32, from: &Path) -> io::Result<()> {
        self.parents(name)?;
        let mut src = File::open(from)?;
        let size = src.metadata()?.len();
        self.header(name, S_IFREG | mode, size, (0, 0))?;
        let copied = io::copy(&mut src, &mut self.out)?;
        assert_eq!(
            copied,
            size,
            "{} changed while being copied",
            from.display()
        );
        self.written += copied;
        self.pad()
    }

    fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.parents(name)?;
        self.header(name, S_IFCHR | mode, 0, (major, minor))
    }

    fn finish(mut self) -> io::Result<()> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()
    }
}

/// The shared libraries (and the dynamic loader) that `ldd` names for `bin`; none if static.
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new(tool("ldd", "libc-bin"))
        .arg(bin)
        .output()
        .expect("run ldd");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Vec::new();
    }
    assert!(out.status.success(), "ldd {}: {text}", bin.display());
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        assert!(!line.contains("not found"), "ldd {}: {line}", bin.display());
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        // linux-vdso.so.1 has no file.
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs
}

fn build_initrd(path: &Path, busybox: &Path) {
    let tcptrace = tcptrace_bin();
    let scenario = PathBuf::from(SCENARIO);
    let bins = [
        ("bin/busybox", busybox.to_path_buf()),
        ("bin/tcptrace", tcptrace),
        ("bin/scenario", scenario),
    ];
    let mut libs = BTreeSet::new();
    for (_, host) in &bins {
        libs.extend(libraries(host));
    }

    let mut cpio = Newc::create(path);
    let mut write = || -> io::Result<()> {
        for d in ["dev", "proc", "sys", "tmp"] {
            cpio.dir(d)?;
        }
        // /init's stdio is /dev/console, opened by the kernel before /init runs.
        cpio.char_dev("dev/console", 0o600, 5, 1)?;
        cpio.bytes("init", 0o755, INIT.as_bytes())?;
        for (name, host) in &bins {
            cpio.file(name, 0o755, host)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", host.display())))?;
        }
        for lib in &libs {
            let name = lib.to_str().unwrap().trim_start_matches('/');
            cpio.file(name, 0o755, lib)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", lib.display())))?;
        }
        Ok(())
    };
    write().unwrap_or_else(|e| panic!("writing the initramfs {}: {e}", path.display()));
    cpio.finish()
        .unwrap_or_else(|e| panic!("writing the initramfs {}: {e}", path.display()));
}
