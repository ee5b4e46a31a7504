//! `cargo xtask`: set-up, build, run and test tcptrace on a fresh machine.
//!
//! Every command first runs `setup`, which installs what is missing (Debian packages, nightly's
//! rust-src, bpf-linker built against LLVM 22) and is a no-op in seconds when all is there.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod image;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set-up, build, run and test tcptrace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Set up and build tcptrace (release).
    Build,
    /// Set up, build and run tcptrace as root: `cargo xtask run -- watch`.
    Run {
        /// Arguments for tcptrace.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build and run every test: unit tests and the privileged real-kernel scenarios.
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure tracing overhead on a connection-churn workload; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Set up and build the container image (static binary, FROM scratch) with podman,
    /// offline; prints its name.
    Image,
}

/// Debian packages: the first four build bpf-linker; the rest are used by the tests and the
/// benchmark (ip, sysctl, ss, setpriv, bpftool, bpftrace, prometheus, and QEMU with busybox to
/// boot Debian's 6.1 kernel for the old-kernel test).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "procps",
    "util-linux",
    "bpftool",
    "bpftrace",
    "prometheus",
    "qemu-system-x86",
    "busybox-static",
    // The interactive screen of `watch` is tested under tmux (send-keys, capture-pane).
    "tmux",
    // The leak-stack test compiles a C program with frame pointers.
    "gcc",
    // The seccomp test traces every system call the daemon makes.
    "strace",
    // `cargo xtask image` builds the container image, and its test runs it; runc beside crun
    // for hosts whose cgroups are v1 or hybrid (crun needs cgroup v2 alone).
    "podman",
    "runc",
    // Real software for the tests: a database server and its Python client library, a
    // reverse proxy.
    "redis-server",
    "python3-redis",
    "nginx-light",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => setup().and_then(|_| build()).map(|_| ()),
        Cmd::Run { args } => setup()
            .and_then(|_| build())
            .and_then(|bin| run(&bin, &args)),
        Cmd::Test { args } => setup().and_then(|_| test(&args)),
        Cmd::Image => setup().and_then(|_| image::build()).map(|_| ()),
        Cmd::Bench(a) => setup()
            .and_then(|_| build())
            .and_then(|bin| bench::run(&bin, a)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs a command, failing with its name when it does not succeed.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// `cmd` as root: as is when we are root, else through sudo.
fn as_root(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn setup() -> Result<()> {
    // The old-kernel test downloads Debian's 6.1 kernel package: apt must know it.
    let knows_6_1 = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if !knows_6_1 {
        println!("xtask setup: refreshing apt package lists (apt-get update)");
        sh(as_root("apt-get").args(["update", "-qq"]))?;
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if !missing.is_empty() {
        println!(
            "xtask setup: installing Debian packages: {}",
            missing.join(" ")
        );
        sh(as_root("apt-get").args(["update", "-qq"]))?;
        sh(as_root("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
    }

    if !quiet_ok(Command::new("rustc").args(["+nightly", "--version"])) {
        bail!(
            "no nightly Rust toolchain: the eBPF programs need one (`rustup toolchain install nightly`)"
        );
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src"))
    {
        println!("xtask setup: installing rust-src for the nightly toolchain");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        println!(
            "xtask setup: installing bpf-linker {BPF_LINKER_VERSION} built against LLVM 22 (about 2 minutes)"
        );
        sh(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ]))?;
    }

    // The container image's static binary.
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(workspace_root())
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&targets.stdout)
        .lines()
        .any(|l| l.trim() == image::MUSL)
    {
        println!(
            "xtask setup: adding the Rust target {} (the image's static build)",
            image::MUSL
        );
        sh(Command::new("rustup")
            .args(["target", "add", image::MUSL])
            .current_dir(workspace_root()))?;
    }

    // The Kubernetes manifest is checked against the API schemas in the tests.
    if !quiet_ok(Command::new("kubernetes-validate").arg("--version")) {
        println!("xtask setup: installing kubernetes-validate (PyPI) to check deploy/kubernetes");
        sh(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "--root-user-action=ignore",
            "kubernetes-validate",
        ]))?;
    }

    // gunicorn: a real prefork server for the holder tests.
    if !quiet_ok(Command::new("python3").args(["-c", "import gunicorn"])) {
        println!("xtask setup: installing gunicorn (PyPI) for the prefork server tests");
        sh(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "--root-user-action=ignore",
            "gunicorn",
        ]))?;
    }

    if !Path::new("/sys/kernel/tracing/events").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        println!("xtask setup: mounting tracefs at /sys/kernel/tracing");
        sh(as_root("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Builds the release binary; returns its path.
fn build() -> Result<PathBuf> {
    sh(cargo().args(["build", "--release", "-p", "tcptrace"]))?;
    Ok(workspace_root().join("target/release/tcptrace"))
}

fn run(bin: &Path, args: &[String]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new(bin)
    } else {
        println!("xtask run: tcptrace needs root; running it through sudo");
        let mut c = Command::new("sudo");
        c.arg(bin);
        c
    };
    let status = cmd.args(args).status().context("running tcptrace")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The test run's cargo arguments: every crate but the eBPF one (built by tcptrace's build script).
const TEST_ARGS: [&str; 5] = [
    "test",
    "--release",
    "--workspace",
    "--exclude",
    "tcptrace-ebpf",
];

fn test(args: &[String]) -> Result<()> {
    // Built once, as the tests build it: a `cargo build -p tcptrace` first would resolve other
    // features for the shared dependencies, and the test build would then compile tcptrace and
    // its eBPF programs a second time (about 1.5 minutes of CI).
    sh(cargo().args(TEST_ARGS).arg("--no-run"))?;
    let bin = workspace_root().join("target/release/tcptrace");
    // The image is tested like the rest (run with the DaemonSet's privileges).
    let (image, image_bin) = image::build()?;
    if !is_root() {
        println!(
            "xtask test: not root: the privileged scenario tests will print SKIP; run as root (e.g. `sudo -E cargo xtask test`) to run them"
        );
    }
    sh(cargo()
        .env("TCPTRACE_BIN", &bin)
        .env("TCPTRACE_IMAGE", &image)
        .env("TCPTRACE_IMAGE_BIN", &image_bin)
        .args(TEST_ARGS)
        .arg("--")
        .args(args))?;
    if !args.is_empty() {
        // A filtered run: the caller wants those tests only.
        return Ok(());
    }
    // The benchmark harness, briefly, so that it cannot rot (figures are not asserted).
    if is_root() {
        println!("xtask test: benchmark smoke run (cargo xtask bench --smoke)");
        bench::run(&bin, bench::BenchArgs::smoke())?;
        println!("xtask test: benchmark smoke run ok");
    } else {
        println!("SKIP benchmark smoke run: needs root (run cargo xtask test as root)");
    }
    Ok(())
}
