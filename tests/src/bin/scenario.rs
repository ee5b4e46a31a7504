//! Helper processes for the real-kernel scenario tests.
//!
//! Every subcommand prints `READY <info>` (flushed) once its setup is done, then further status
//! lines, and finally holds (sleeps forever) so that its pid stays alive for the observer.
//! Any unexpected outcome prints a message on stderr and exits with status 1.
//!
//! ```text
//! scenario leak-server --addr 127.0.0.1:0 --count K          READY <port>, ACCEPTED K
//! scenario clients --to ADDR --count K [--wait-stdin]        READY <pid>, [CONNECTED K], DONE
//! scenario serve --addr 127.0.0.1:0                          READY <port>
//! scenario churn --to ADDR --count N [--rst]                 READY <pid>, DONE N
//! scenario exhaust --count F [--hold H]                       READY 5555, DONE F
//! scenario refused --to ADDR --count N [--nonblocking]        READY <pid>, DONE N
//! ```

use std::io::{self, BufRead, Read, Write};
use std::mem;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::exit;
use std::thread;
use std::time::Duration;

/// Port `exhaust` listens on; it is fixed so that it never comes from the ephemeral range.
const EXHAUST_PORT: u16 = 5555;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        die("usage: scenario <leak-server|clients|serve|churn|exhaust|refused> [options]");
    };
    let opts = Opts(rest);
    match cmd.as_str() {
        "leak-server" => leak_server(opts.addr("--addr"), opts.count()),
        "clients" => clients(opts.addr("--to"), opts.count(), opts.flag("--wait-stdin")),
        "serve" => serve(opts.addr("--addr")),
        "churn" => churn(opts.addr("--to"), opts.count(), opts.flag("--rst")),
        "exhaust" => exhaust(opts.count(), opts.number("--hold").unwrap_or(2)),
        "refused" => refused(opts.addr("--to"), opts.count(), opts.flag("--nonblocking")),
        other => die(&format!("unknown subcommand {other:?}")),
    }
}

/// Accepts `count` connections and keeps every one of them open forever.
fn leak_server(addr: SocketAddr, count: usize) -> ! {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    let port = listener.local_addr().expect("local_addr").port();
    say(&format!("READY {port}"));
    let mut kept = Vec::with_capacity(count);
    while kept.len() < count {
        let (stream, _) = listener
            .accept()
            .unwrap_or_else(|e| die(&format!("accept: {e}")));
        kept.push(stream);
    }
    say(&format!("ACCEPTED {count}"));
    hold(kept)
}

/// Opens `count` connections, then closes them all normally (FIN).
fn clients(to: SocketAddr, count: usize, wait_stdin: bool) -> ! {
    say(&format!("READY {}", std::process::id()));
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let s =
            TcpStream::connect(to).unwrap_or_else(|e| die(&format!("connect #{i} to {to}: {e}")));
        streams.push(s);
    }
    if wait_stdin {
        say(&format!("CONNECTED {count}"));
        let mut line = String::new();
        io::stdin()
            .lock()
            .read_line(&mut line)
            .unwrap_or_else(|e| die(&format!("stdin: {e}")));
    }
    drop(streams);
    say("DONE");
    hold(())
}

/// Accepts everything forever; each connection is read to its end (so the peer closes first)
/// and then closed.
fn serve(addr: SocketAddr) -> ! {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    let port = listener.local_addr().expect("local_addr").port();
    say(&format!("READY {port}"));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            // Ends on EOF (peer's FIN) or on an error such as a reset; then the drop closes.
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        });
    }
    die("listener stopped")
}

/// Opens and closes `count` connections one after the other. With `rst`, each close is an
/// abortive close (SO_LINGER {1, 0}): an RST is sent and the socket skips TIME_WAIT.
fn churn(to: SocketAddr, count: usize, rst: bool) -> ! {
    say(&format!("READY {}", std::process::id()));
    for i in 0..count {
        let s =
            TcpStream::connect(to).unwrap_or_else(|e| die(&format!("connect #{i} to {to}: {e}")));
        if rst {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger)
                .unwrap_or_else(|e| die(&format!("SO_LINGER: {e}")));
        }
        drop(s);
    }
    say(&format!("DONE {count}"));
    hold(())
}

/// Meant for a network namespace whose ip_local_port_range holds exactly two ports: holds two
/// connections to 127.0.0.1:5555, then expects `count` more connects to fail with EADDRNOTAVAIL.
/// Holds `hold` connections to 127.0.0.1:5555 (all of a range of that many ports), then makes
/// `count` connects that must fail with EADDRNOTAVAIL.
fn exhaust(count: usize, ports: usize) -> ! {
    let addr: SocketAddr = ([127, 0, 0, 1], EXHAUST_PORT).into();
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    say(&format!("READY {EXHAUST_PORT}"));
    let mut held = Vec::new();
    for i in 0..ports {
        let c = TcpStream::connect(addr)
            .unwrap_or_else(|e| die(&format!("connect #{i} to {addr}: {e}")));
        let (a, _) = listener
            .accept()
            .unwrap_or_else(|e| die(&format!("accept: {e}")));
        held.push((c, a));
    }
    for i in 0..count {
        match TcpStream::connect(addr) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            Err(e) => die(&format!(
                "failing connect #{i} to {addr}: expected EADDRNOTAVAIL, got {e}"
            )),
            Ok(s) => die(&format!(
                "failing connect #{i} to {addr}: expected EADDRNOTAVAIL, but it connected from {:?} \
                 (is ip_local_port_range really {ports} ports?)",
                s.local_addr()
            )),
        }
    }
    say(&format!("DONE {count}"));
    hold((listener, held))
}

/// Makes `count` connects to a port nobody listens on; each must be refused.
fn refused(to: SocketAddr, count: usize, nonblocking: bool) -> ! {
    say(&format!("READY {}", std::process::id()));
    for i in 0..count {
        let result = if nonblocking {
            connect_nonblocking(to)
        } else {
            TcpStream::connect(to).map(drop)
        };
        match result {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            Err(e) => die(&format!(
                "connect #{i} to {to}: expected ECONNREFUSED, got {e}"
            )),
            Ok(()) => die(&format!(
                "connect #{i} to {to}: expected ECONNREFUSED, but it connected"
            )),
        }
    }
    say(&format!("DONE {count}"));
    hold(())
}

/// A non-blocking connect that must answer EINPROGRESS; then waits for the outcome with poll()
/// and returns what SO_ERROR says.
fn connect_nonblocking(to: SocketAddr) -> io::Result<()> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr_of(to);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
    let err = io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() != Some(libc::EINPROGRESS) {
        die(&format!(
            "non-blocking connect to {to}: expected EINPROGRESS, got {}",
            if rc == 0 {
                "success".to_string()
            } else {
                err.to_string()
            }
        ));
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    if n != 1 {
        die(&format!(
            "poll after non-blocking connect to {to}: returned {n}"
        ));
    }
    let mut so_error: libc::c_int = 0;
    let mut optlen = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: so_error is a c_int and optlen says so.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut so_error).cast(),
            &mut optlen,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    drop(sock);
    if so_error == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(so_error))
    }
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Keeps `what` alive and the process running until it is killed.
fn hold<T>(what: T) -> ! {
    loop {
        thread::sleep(Duration::from_secs(3600));
        std::hint::black_box(&what);
    }
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    // A vanished reader is no reason to stop holding the sockets.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn die(msg: &str) -> ! {
    eprintln!("scenario: {msg}");
    exit(1)
}

struct Opts<'a>(&'a [String]);

impl Opts<'_> {
    fn value(&self, name: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == name)?;
        match self.0.get(i + 1) {
            Some(v) => Some(v.as_str()),
            None => die(&format!("{name} needs a value")),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    fn addr(&self, name: &str) -> SocketAddr {
        let v = self
            .value(name)
            .unwrap_or_else(|| die(&format!("missing {name} ADDR")));
        v.parse()
            .unwrap_or_else(|e| die(&format!("{name} {v:?}: {e}")))
    }

    /// An optional number option.
    fn number(&self, name: &str) -> Option<usize> {
        let v = self.value(name)?;
        Some(
            v.parse()
                .unwrap_or_else(|e| die(&format!("{name} {v:?}: {e}"))),
        )
    }

    fn count(&self) -> usize {
        let v = self
            .value("--count")
            .unwrap_or_else(|| die("missing --count N"));
        v.parse()
            .unwrap_or_else(|e| die(&format!("--count {v:?}: {e}")))
    }
}
