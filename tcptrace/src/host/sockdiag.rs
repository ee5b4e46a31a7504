//! The kernel's own list of TCP sockets in this network namespace, from sock_diag
//! (NETLINK_SOCK_DIAG, an inet_diag dump of IPv4 and IPv6), as the reconcile takes it.
//!
//! sock_diag rather than /proc/net/tcp: it is binary (no text to format and parse per socket),
//! its cost does not grow with the number of read() calls, and it gives the mini-sockets'
//! substates (TIME_WAIT or FIN_WAIT2) with their timer, which tells them from full sockets.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, Timer, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

/// One socket as sock_diag lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// The kernel's TCP state number; for a mini-socket, its substate (TIME_WAIT or FIN_WAIT2).
    pub state: u8,
    /// A mini-socket (`inet_timewait_sock`) rather than a full socket.
    pub timewait: bool,
    /// From `tcp_info` (full sockets): milliseconds since the last ACK and the last data
    /// were received.
    pub last_ack_recv_ms: Option<u32>,
    pub last_data_recv_ms: Option<u32>,
}

/// `tcpi_last_data_recv` and `tcpi_last_ack_recv` in `struct tcp_info` (linux/tcp.h): after 8
/// bytes of u8 fields and 11 u32s.
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;

fn tcp_info_u32(info: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(info.get(at..at + 4)?.try_into().ok()?))
}

/// Every TCP socket of this network namespace (IPv4 and IPv6), mini-sockets included.
pub fn tcp_sockets() -> io::Result<Vec<DiagSocket>> {
    tcp_sockets_in(StateFlags::all())
}

/// This namespace's CLOSE_WAIT sockets only (with their tcp_info): cheap beside a full dump.
pub fn close_wait_sockets() -> io::Result<Vec<DiagSocket>> {
    tcp_sockets_in(StateFlags::CLOSE_WAIT)
}

fn tcp_sockets_in(states: StateFlags) -> io::Result<Vec<DiagSocket>> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&NlAddr::new(0, 0))?;
    let mut out = Vec::new();
    dump(
        &mut sock,
        AF_INET,
        SocketId::new_v4(),
        states.clone(),
        &mut out,
    )?;
    match dump(&mut sock, AF_INET6, SocketId::new_v6(), states, &mut out) {
        // A kernel without IPv6 answers the IPv6 dump with an error: IPv4 is all there is.
        Err(e) if e.raw_os_error().is_some() => {}
        r => r?,
    }
    Ok(out)
}

fn dump(
    sock: &mut Socket,
    family: u8,
    id: SocketId,
    states: StateFlags,
    out: &mut Vec<DiagSocket>,
) -> io::Result<()> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut req = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states,
            socket_id: id,
        })
        .into(),
    );
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;

    let mut rx: Vec<u8> = Vec::with_capacity(1 << 16);
    loop {
        rx.clear();
        let n = sock.recv(&mut rx, 0)?;
        let mut off = 0;
        while off < n {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[off..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(match e.code {
                        Some(code) => io::Error::from_raw_os_error(-code.get()),
                        None => io::Error::other("sock_diag answered an empty error"),
                    });
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    let state = h.state;
                    let id = &h.socket_id;
                    let info = r.nlas.iter().find_map(|n| match n {
                        Nla::TcpInfo(bytes) => Some(bytes.as_slice()),
                        _ => None,
                    });
                    out.push(DiagSocket {
                        last_ack_recv_ms: info.and_then(|i| tcp_info_u32(i, TCPI_LAST_ACK_RECV)),
                        last_data_recv_ms: info.and_then(|i| tcp_info_u32(i, TCPI_LAST_DATA_RECV)),
                        local: addr(id.source_address, id.source_port),
                        remote: addr(id.destination_address, id.destination_port),
                        state,
                        timewait: matches!(h.timer, Some(Timer::TimeWait)),
                    });
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, as the tracepoint's decoder and /proc/net/tcp6 give them.
fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    SocketAddr::new(ip, port)
}

/// net.ipv4.tcp_fin_timeout of this network namespace, in seconds.
pub fn tcp_fin_timeout() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use tcptrace_common::tcp_state;

    /// A dump needs no privilege for this namespace's sockets: a listener, both ends of a
    /// connection, and after an active close a FIN_WAIT2 mini-socket, as the kernel has them.
    #[test]
    fn dump_lists_this_namespaces_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (la, ca) = (l.local_addr().unwrap(), c.local_addr().unwrap());
        let start = std::time::Instant::now();
        let all = tcp_sockets().expect("sock_diag dump");
        println!("{} sockets in {:?}", all.len(), start.elapsed());
        let find = |local, remote| all.iter().find(|k| k.local == local && k.remote == remote);
        let unspec: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(find(la, unspec).map(|k| k.state), Some(tcp_state::LISTEN));
        assert_eq!(find(ca, la).map(|k| k.state), Some(tcp_state::ESTABLISHED));
        assert_eq!(find(la, ca).map(|k| k.state), Some(tcp_state::ESTABLISHED));

        drop(c);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let all = tcp_sockets().expect("sock_diag dump");
            let got = all
                .iter()
                .find(|k| k.local == ca && k.remote == la)
                .copied();
            if let Some(k) = got
                && k.state == tcp_state::FIN_WAIT2
            {
                assert!(k.timewait, "an orphan in FIN_WAIT2 is a mini-socket: {k:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no FIN_WAIT2: {got:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(s);
    }
}
