//! churngen: loopback TCP load for `cargo xtask bench`.
//!
//! * `churn`: connect + accept + close on 127.0.0.1 as fast as the machine allows, with client
//!   and acceptor threads on every core. `--close rst` closes both ends with SO_LINGER {1,0}
//!   (RST, no TIME_WAIT, so ports never run out); `--close fin` closes normally (the client
//!   closes first, the server reads EOF then closes), meant for a network namespace with a wide
//!   port range and `tcp_tw_reuse=1`, and several listeners (`--listeners`). Runs `--secs`, then
//!   prints one line: `connections=N failed=N secs=F cps=F`.
//! * `leak`: accepts connections whose peer closes, and never closes them: one CLOSE_WAIT socket
//!   every `--every` seconds. Prints `closewait i=K unix=F` as each one enters CLOSE_WAIT, then
//!   `done`, and holds the sockets until stdin closes.
//! * `hold`: opens `--pairs` connected pairs, prints `ready pairs=N secs=F`, and holds them until
//!   stdin closes. One process holds what its hard RLIMIT_NOFILE allows: run several for more.
//!
//!   With `--close-clients` the client ends are closed (FIN) once all are open, so the process
//!   holds `--pairs` CLOSE_WAIT sockets.
//! * `idle`: forks `--procs` children that sleep, prints `ready procs=N`, holds until stdin
//!   closes (the children die with it).
//!
//! `leak`, `hold` and `idle` end when stdin reaches end of file, so a killed parent leaves
//! nothing behind.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Barrier},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "churngen",
    about = "Loopback TCP load for the tcptrace benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect, accept and close on loopback as fast as possible.
    Churn {
        /// How long to run.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// How both ends close.
        #[arg(long, value_enum, default_value_t = Close::Rst)]
        close: Close,
        /// Client threads (and as many acceptor threads); default: one per core.
        #[arg(long)]
        threads: Option<usize>,
        /// First listening port (default: any free ones). Fixed ports bound the TIME_WAIT
        /// sockets of FIN runs to one per ephemeral port and listener, whatever ran before;
        /// keep them out of the ephemeral range (ip_local_reserved_ports).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Listeners (ports `--port`, `--port`+1, ...). With FIN close each destination can
        /// reuse a local port once per second (tcp_tw_reuse), so one listener caps the rate at
        /// about 30,000 connections/s whatever the CPU: use several.
        #[arg(long, default_value_t = 1)]
        listeners: usize,
    },
    /// Make CLOSE_WAIT sockets one at a time and hold them until stdin closes.
    Leak {
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Seconds between two sockets.
        #[arg(long, default_value_t = 0.37)]
        every: f64,
    },
    /// Hold connected pairs open until stdin closes.
    Hold {
        #[arg(long)]
        pairs: usize,
        /// Listening ports to spread the connections over (each destination has its own
        /// ephemeral port space).
        #[arg(long, default_value_t = 8)]
        listeners: usize,
        /// Close the client ends (FIN): the held server ends sit in CLOSE_WAIT.
        #[arg(long)]
        close_clients: bool,
    },
    /// Fork idle processes and hold them until stdin closes.
    Idle {
        #[arg(long)]
        procs: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Close {
    Rst,
    Fin,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Churn {
            secs,
            close,
            threads,
            port,
            listeners,
        } => churn(secs, close, threads, port, listeners),
        Cmd::Leak { count, every } => leak(count, every),
        Cmd::Hold {
            pairs,
            listeners,
            close_clients,
        } => hold(pairs, listeners, close_clients),
        Cmd::Idle { procs } => idle(procs),
    }
}

/// A listener on 127.0.0.1:`port` (0: any) with a deep accept queue (std's 128 overflows
/// at tens of thousands of connections per second, and an overflow costs a 1 s SYN retry).
fn listener(port: u16) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding a listener on 127.0.0.1:{port}"))?;
    // Linux lets listen() on a listening socket change its backlog.
    // SAFETY: a valid socket descriptor.
    if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// SO_LINGER {on, 0}: close() sends RST and the socket skips TIME_WAIT. Accepted sockets
/// inherit it from their listener.
fn set_linger_zero(fd: &impl AsRawFd) -> std::io::Result<()> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid descriptor, pointer and length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const lg).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn churn(
    secs: f64,
    close: Close,
    threads: Option<usize>,
    port: u16,
    listeners: usize,
) -> Result<()> {
    let threads = threads.unwrap_or_else(cores).max(1);
    let mut addrs = Vec::new();
    for i in 0..listeners.max(1) {
        let (l, addr) = listener(if port == 0 { 0 } else { port + i as u16 })?;
        if close == Close::Rst {
            set_linger_zero(&l)?;
        }
        addrs.push(addr);
        let l = Arc::new(l);
        // Acceptors: accept and close (after reading EOF with FIN, so the client closes first
        // and every connection makes the same transitions). They die with the process.
        for _ in 0..threads {
            let l = l.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    if let Ok((mut s, _)) = l.accept()
                        && close == Close::Fin
                    {
                        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                    }
                }
            });
        }
    }
    let addrs = Arc::new(addrs);
    let start = Arc::new(Barrier::new(threads + 1));
    let clients: Vec<_> = (0..threads)
        .map(|k| {
            let start = start.clone();
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                start.wait();
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                let (mut ok, mut failed) = (0u64, 0u64);
                // Round robin over the listeners, each thread from a different one.
                let mut next = k;
                while Instant::now() < deadline {
                    next = (next + 1) % addrs.len();
                    match TcpStream::connect(addrs[next]) {
                        Ok(s) => {
                            if close == Close::Rst {
                                let _ = set_linger_zero(&s);
                            }
                            drop(s);
                            ok += 1;
                        }
                        // Rare at full speed (an RST racing a reused port); counted apart.
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.join().expect("client thread");
        ok += o;
        failed += f;
    }
    let took = t0.elapsed().as_secs_f64();
    println!(
        "connections={ok} failed={failed} secs={took:.3} cps={:.1}",
        ok as f64 / took
    );
    std::io::stdout().flush()?;
    // Acceptors may be blocked in accept(): leave without joining them.
    std::process::exit(0)
}

/// TCP state of a socket (TCP_INFO), e.g. 8 = CLOSE_WAIT.
fn tcp_state(s: &TcpStream) -> Option<u8> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        (r == 0).then_some(info.tcpi_state)
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Exits the process when stdin closes (the parent is done with us, or gone), even while the
/// main thread is still working.
fn exit_on_stdin_eof() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

/// Holds everything until stdin closes.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

const TCP_CLOSE_WAIT: u8 = 8;

fn leak(count: usize, every: f64) -> Result<()> {
    exit_on_stdin_eof();
    let (l, addr) = listener(0)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "leaking port={} pid={}",
        addr.port(),
        std::process::id()
    )?;
    out.flush()?;
    let mut kept = Vec::with_capacity(count);
    for i in 0..count {
        let client = TcpStream::connect(addr)?;
        let (server, _) = l.accept()?;
        // The peer closes (FIN): our end goes to CLOSE_WAIT, and we never close it.
        drop(client);
        let polled = Instant::now();
        while tcp_state(&server) != Some(TCP_CLOSE_WAIT) {
            if polled.elapsed() > Duration::from_secs(2) {
                bail!("socket {i} did not reach CLOSE_WAIT");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        writeln!(out, "closewait i={i} unix={:.6}", unix_now())?;
        out.flush()?;
        kept.push(server);
        std::thread::sleep(Duration::from_secs_f64(every));
    }
    writeln!(out, "done")?;
    out.flush()?;
    drop(out);
    let _kept = kept;
    park_forever()
}

/// Raises the soft RLIMIT_NOFILE to at least `n`. The hard limit stays: raising it needs
/// CAP_SYS_RESOURCE, which containers often drop, so the bench spreads pairs over processes.
fn raise_nofile(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur >= n {
        return Ok(());
    }
    if lim.rlim_max < n {
        bail!(
            "{n} descriptors needed but the hard RLIMIT_NOFILE is {}: hold fewer pairs per process",
            lim.rlim_max
        );
    }
    lim.rlim_cur = n;
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "cannot raise RLIMIT_NOFILE to {n}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn idle(procs: usize) -> Result<()> {
    exit_on_stdin_eof();
    for i in 0..procs {
        // SAFETY: the child only calls async-signal-safe functions (prctl, pause) before it
        // is killed.
        match unsafe { libc::fork() } {
            -1 => bail!("fork #{i}: {}", std::io::Error::last_os_error()),
            0 => loop {
                // SAFETY: plain syscalls; the child dies with its parent.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    libc::pause();
                }
            },
            _ => {}
        }
    }
    println!("ready procs={procs}");
    std::io::stdout().flush()?;
    park_forever()
}

fn hold(pairs: usize, listeners: usize, close_clients: bool) -> Result<()> {
    exit_on_stdin_eof();
    raise_nofile(2 * pairs as u64 + listeners as u64 + 32)?;
    let ls: Vec<(TcpListener, SocketAddr)> = (0..listeners.max(1))
        .map(|_| {
            let (l, a) = listener(0)?;
            // Inherited by the accepted ends: tear-down sends RST instead of leaving TIME_WAIT.
            set_linger_zero(&l)?;
            Ok((l, a))
        })
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let mut kept = Vec::with_capacity(2 * pairs);
    for i in 0..pairs {
        let (l, addr) = &ls[i % ls.len()];
        let c = TcpStream::connect(addr).with_context(|| format!("connect #{i}"))?;
        if !close_clients {
            set_linger_zero(&c)?;
        }
        // Loopback completes the handshake inside connect(): the accept does not wait.
        let (s, _) = l.accept().with_context(|| format!("accept #{i}"))?;
        if !close_clients {
            kept.push(c);
        }
        kept.push(s);
    }
    println!("ready pairs={pairs} secs={:.3}", t0.elapsed().as_secs_f64());
    std::io::stdout().flush()?;
    let _kept = kept;
    park_forever()
}
