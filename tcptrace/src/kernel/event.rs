//! Raw ring-buffer records decoded into typed events. No allocation per event.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcptrace_common::{
    AF_INET6, Event, FLAG_OWNER_CURRENT, FLAG_OWNER_INHERITED, FLAG_OWNER_RECORDED, KIND_CONNECT,
    KIND_ERROR, KIND_STATE,
};

/// Kernel TCP state numbers (include/net/tcp_states.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    pub fn from_u8(v: u8) -> Option<Self> {
        use TcpState::*;
        Some(match v {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            12 => NewSynRecv,
            _ => return None,
        })
    }

    /// The name `ss` and bcc's tcpstates use.
    pub fn name(self) -> &'static str {
        use TcpState::*;
        match self {
            Established => "ESTABLISHED",
            SynSent => "SYN_SENT",
            SynRecv => "SYN_RECV",
            FinWait1 => "FIN_WAIT1",
            FinWait2 => "FIN_WAIT2",
            TimeWait => "TIME_WAIT",
            Close => "CLOSE",
            CloseWait => "CLOSE_WAIT",
            LastAck => "LAST_ACK",
            Listen => "LISTEN",
            Closing => "CLOSING",
            NewSynRecv => "NEW_SYN_RECV",
        }
    }
}

/// Where the owner fields of an event come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    /// The task running in process context (connect, listen, close).
    Current,
    /// Recorded earlier for this socket by the kernel programs.
    Recorded,
    /// Inherited from the listening socket (accepted connection).
    Inherited,
}

/// The process that owns a socket, as the kernel side saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub cgroup: u64,
    pub comm: [u8; 16],
    pub source: OwnerSource,
}

impl Owner {
    pub fn comm_str(&self) -> &str {
        comm_str(&self.comm)
    }
}

/// The NUL-terminated command name as text (lossy bytes become an empty string).
pub fn comm_str(comm: &[u8; 16]) -> &str {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    std::str::from_utf8(&comm[..end]).unwrap_or("")
}

/// A decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEvent {
    /// A state transition of one socket.
    State {
        ts_ns: u64,
        sk: u64,
        old: TcpState,
        new: TcpState,
        local: SocketAddr,
        remote: SocketAddr,
        owner: Option<Owner>,
        /// Network namespace of the socket (its nsfs inode); 0 when unknown.
        netns: u64,
    },
    /// `connect()` returned an error or -EINPROGRESS. `sk` is 0 when the call failed before the
    /// socket changed state.
    Connect {
        ts_ns: u64,
        sk: u64,
        remote: SocketAddr,
        ret: i32,
        owner: Owner,
        /// Network namespace of the socket; 0 when unknown (the call failed before the socket
        /// changed state).
        netns: u64,
    },
    /// An asynchronous socket error (`sock:inet_sk_error_report`), matched by address.
    Error {
        ts_ns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        errno: i32,
    },
}

impl TcpEvent {
    pub fn ts_ns(&self) -> u64 {
        match *self {
            TcpEvent::State { ts_ns, .. }
            | TcpEvent::Connect { ts_ns, .. }
            | TcpEvent::Error { ts_ns, .. } => ts_ns,
        }
    }
}

/// An address as the kernel reports it; IPv4-mapped IPv6 addresses become IPv4 so that the
/// same connection has one key whatever the socket's family.
pub fn addr(family: u8, bytes: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*bytes);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    };
    SocketAddr::new(ip, port)
}

/// Decodes one ring-buffer record. `None` for a record of an unknown kind or state.
pub fn decode(ev: &Event) -> Option<TcpEvent> {
    let owner = if ev.pid == 0 {
        None
    } else {
        let source = if ev.flags & FLAG_OWNER_INHERITED != 0 {
            OwnerSource::Inherited
        } else if ev.flags & FLAG_OWNER_RECORDED != 0 {
            OwnerSource::Recorded
        } else if ev.flags & FLAG_OWNER_CURRENT != 0 {
            OwnerSource::Current
        } else {
            OwnerSource::Recorded
        };
        Some(Owner {
            pid: ev.pid,
            cgroup: ev.cgroup,
            comm: ev.comm,
            source,
        })
    };
    match ev.kind {
        KIND_STATE => Some(TcpEvent::State {
            ts_ns: ev.ts_ns,
            sk: ev.skaddr,
            old: TcpState::from_u8(ev.oldstate)?,
            new: TcpState::from_u8(ev.newstate)?,
            local: addr(ev.family, &ev.saddr, ev.sport),
            remote: addr(ev.family, &ev.daddr, ev.dport),
            owner,
            netns: ev.netns as u64,
        }),
        KIND_CONNECT => Some(TcpEvent::Connect {
            ts_ns: ev.ts_ns,
            sk: ev.skaddr,
            remote: addr(ev.family, &ev.daddr, ev.dport),
            ret: ev.ret,
            owner: owner?,
            netns: ev.netns as u64,
        }),
        KIND_ERROR => Some(TcpEvent::Error {
            ts_ns: ev.ts_ns,
            local: addr(ev.family, &ev.saddr, ev.sport),
            remote: addr(ev.family, &ev.daddr, ev.dport),
            errno: ev.ret,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcptrace_common::AF_INET;

    #[test]
    fn decodes_a_v4_transition_with_recorded_owner() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let raw = Event {
            ts_ns: 5,
            skaddr: 0xffff_0001,
            pid: 42,
            netns: 43,
            kind: KIND_STATE,
            oldstate: 1,
            newstate: 8,
            family: AF_INET,
            sport: 8080,
            dport: 40000,
            flags: FLAG_OWNER_RECORDED,
            saddr,
            daddr: saddr,
            comm,
            ..Event::default()
        };
        let ev = decode(&raw).unwrap();
        let TcpEvent::State {
            old,
            new,
            local,
            remote,
            owner,
            ..
        } = ev
        else {
            panic!("not a state event: {ev:?}");
        };
        assert_eq!((old, new), (TcpState::Established, TcpState::CloseWait));
        assert_eq!(local.to_string(), "127.0.0.1:8080");
        assert_eq!(remote.to_string(), "127.0.0.1:40000");
        let owner = owner.unwrap();
        assert_eq!((owner.pid, owner.comm_str()), (42, "curl"));
        assert_eq!(owner.source, OwnerSource::Recorded);
    }

    #[test]
    fn v4_mapped_v6_becomes_v4_and_v6_stays_v6() {
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            addr(AF_INET6, &mapped.octets(), 80).to_string(),
            "10.0.0.1:80"
        );
        let lo: Ipv6Addr = "::1".parse().unwrap();
        assert_eq!(addr(AF_INET6, &lo.octets(), 80).to_string(), "[::1]:80");
    }

    #[test]
    fn unknown_kind_or_state_is_rejected() {
        let raw = Event {
            kind: 9,
            ..Event::default()
        };
        assert_eq!(decode(&raw), None);
        let raw = Event {
            kind: KIND_STATE,
            oldstate: 99,
            newstate: 1,
            ..Event::default()
        };
        assert_eq!(decode(&raw), None);
    }
}
