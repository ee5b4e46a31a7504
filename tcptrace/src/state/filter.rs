//! Which processes a snapshot shows: pid, command, container, and the family and port filters
//! (`-4`/`-6`, `--port`, `-L`, `-D`) that a process's sockets or destinations must pass.

use std::net::SocketAddr;

use super::snapshot::PodView;

/// Which processes a snapshot shows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    /// Local or remote ports.
    pub ports: Vec<u16>,
    /// Container ids (or prefixes) and pod names, lowercase.
    pub containers: Vec<String>,
    /// Only IPv4 (4) or only IPv6 (6) sockets and destinations; None: both. An IPv4-mapped
    /// IPv6 address counts as IPv4.
    pub family: Option<u8>,
    /// Local ports (`-L`).
    pub local_ports: Vec<u16>,
    /// Remote ports (`-D`).
    pub remote_ports: Vec<u16>,
}

/// 4 or 6: the family of an address (IPv4-mapped IPv6 is 4).
pub fn family_of(a: &SocketAddr) -> u8 {
    match a {
        SocketAddr::V4(_) => 4,
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => 4,
        SocketAddr::V6(_) => 6,
    }
}

/// Whether a process in this container / pod is one `containers` selects (ids by prefix, pod
/// names whole).
pub fn container_selected(
    containers: &[String],
    container_id: Option<&str>,
    pod: Option<&PodView>,
) -> bool {
    containers.iter().any(|c| {
        container_id.is_some_and(|id| id.starts_with(c.as_str()))
            || pod.is_some_and(|p| p.name == *c)
    })
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.comms.is_empty()
            && self.containers.is_empty()
            && !self.selects_sockets()
    }

    /// Whether the filter says anything about sockets (family, ports).
    pub fn selects_sockets(&self) -> bool {
        self.family.is_some()
            || !self.ports.is_empty()
            || !self.local_ports.is_empty()
            || !self.remote_ports.is_empty()
    }

    /// Whether a socket between `local` and `remote` passes the family and port filters
    /// (`local` None: not known, as for a failed connect; then no local-port list passes).
    pub fn socket_hit(&self, local: Option<&SocketAddr>, remote: &SocketAddr) -> bool {
        let lport = local.map(SocketAddr::port);
        self.family.is_none_or(|f| family_of(remote) == f)
            && (self.ports.is_empty()
                || self.ports.contains(&remote.port())
                || lport.is_some_and(|p| self.ports.contains(&p)))
            && (self.local_ports.is_empty() || lport.is_some_and(|p| self.local_ports.contains(&p)))
            && (self.remote_ports.is_empty() || self.remote_ports.contains(&remote.port()))
    }

    /// Whether an event-stream line with these fields passes.
    pub fn matches_event(
        &self,
        pid: u32,
        comm: &str,
        local: Option<&SocketAddr>,
        remote: &SocketAddr,
    ) -> bool {
        (self.pids.is_empty() || self.pids.contains(&pid))
            && (self.comms.is_empty() || self.comms.iter().any(|c| c == comm))
            && self.socket_hit(local, remote)
    }
}
