//! Containers and pods, from what the host already shows: a process's cgroup path names its
//! container (docker, containerd, cri-o, podman) and, on Kubernetes, its pod's uid; the node's
//! `/var/log/containers/<pod>_<namespace>_<container>-<id>.log` links name the pod, its
//! namespace and the container.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

/// Where the kubelet links each container's log; `TCPTRACE_POD_LOGS` overrides it.
pub const POD_LOGS: &str = "/var/log/containers";

/// What a cgroup path says about a process's container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupContainer {
    /// The full container id (64 lowercase hex digits).
    pub id: String,
    /// The Kubernetes pod uid (with dashes), when the path is a kubepods one.
    pub pod_uid: Option<String>,
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container of a cgroup path: `docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `libpod-<id>.scope`, `/docker/<id>` and `/kubepods/.../<id>`; the innermost
/// match wins. The pod uid comes from a `pod<uid>` component (`kubepods-...-pod<uid>.slice`
/// with underscores under the systemd driver, `pod<uid>` under cgroupfs).
pub fn from_cgroup(path: &str) -> Option<CgroupContainer> {
    const SCOPE_PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let kube = comps.iter().any(|c| c.starts_with("kubepods"));
    let id = comps.iter().enumerate().rev().find_map(|(i, c)| {
        if let Some(stem) = c.strip_suffix(".scope") {
            SCOPE_PREFIXES
                .iter()
                .find_map(|p| stem.strip_prefix(p))
                .filter(|s| is_id(s))
        } else if is_id(c) && (i > 0 && comps[i - 1] == "docker" || kube) {
            Some(*c)
        } else {
            None
        }
    })?;
    let pod_uid = kube
        .then(|| {
            comps.iter().rev().find_map(|c| {
                let c = c.strip_suffix(".slice").unwrap_or(c);
                let uid = c
                    .rsplit_once("-pod")
                    .map(|(_, u)| u)
                    .or(c.strip_prefix("pod"))?;
                let uid = uid.replace('_', "-");
                let ok = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
                ok.then_some(uid.to_ascii_lowercase())
            })
        })
        .flatten();
    Some(CgroupContainer {
        id: id.to_ascii_lowercase(),
        pod_uid,
    })
}

/// A pod's names, as the kubelet's log links give them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// `<pod>_<namespace>_<container>-<64 hex id>.log` -> (id, names). Pod and namespace names cannot
/// contain `_`; a container name cannot either.
pub fn parse_log_name(name: &str) -> Option<(String, PodNames)> {
    let stem = name.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    if !is_id(id) {
        return None;
    }
    let mut it = rest.splitn(3, '_');
    let (pod, namespace, container) = (it.next()?, it.next()?, it.next()?);
    if pod.is_empty() || namespace.is_empty() || container.is_empty() {
        return None;
    }
    Some((
        id.to_ascii_lowercase(),
        PodNames {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
        },
    ))
}

/// Container id -> pod names, from the log links, read again (at most every 10 s) when an id is
/// not there yet.
pub struct PodDirectory {
    dir: PathBuf,
    by_id: HashMap<String, PodNames>,
    read_at: Option<Instant>,
}

const REREAD_EVERY: Duration = Duration::from_secs(10);

impl Default for PodDirectory {
    fn default() -> Self {
        let dir = std::env::var_os("TCPTRACE_POD_LOGS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(POD_LOGS));
        Self {
            dir,
            by_id: HashMap::new(),
            read_at: None,
        }
    }
}

impl PodDirectory {
    pub fn lookup(&mut self, id: &str) -> Option<PodNames> {
        if !self.by_id.contains_key(id) && self.read_at.is_none_or(|t| t.elapsed() >= REREAD_EVERY)
        {
            self.read_at = Some(Instant::now());
            self.by_id = std::fs::read_dir(&self.dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| parse_log_name(e.file_name().to_str()?))
                .collect();
        }
        self.by_id.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e9c2d1b0a99887766554433221100ffeeddccbbaa00112233445566778899";

    #[test]
    fn container_ids_and_pod_uids() {
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice/cri-containerd-{ID}.scope"
                ),
                Some("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"),
            ),
            (
                format!("/kubepods/besteffort/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0/{ID}"),
                Some("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"),
            ),
            (format!("/system.slice/docker-{ID}.scope"), None),
            (format!("/docker/{ID}"), None),
            (format!("/machine.slice/libpod-{ID}.scope/container"), None),
        ];
        for (path, uid) in cases {
            let c = from_cgroup(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(c.id, ID, "{path}");
            assert_eq!(c.pod_uid.as_deref(), uid, "{path}");
        }
        assert_eq!(from_cgroup("/system.slice/nginx.service"), None);
        assert_eq!(from_cgroup(&format!("/user.slice/{ID}")), None);
    }

    #[test]
    fn log_names() {
        let (id, n) = parse_log_name(&format!("web-7d9f_shop_nginx-{ID}.log")).unwrap();
        assert_eq!(id, ID);
        assert_eq!(
            n,
            PodNames {
                namespace: "shop".into(),
                pod: "web-7d9f".into(),
                container: "nginx".into()
            }
        );
        assert_eq!(parse_log_name("web_shop_nginx-123.log"), None);
        assert_eq!(parse_log_name(&format!("web_shop-{ID}.log")), None);
    }
}
