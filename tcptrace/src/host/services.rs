//! Service names of well-known ports, from the host's /etc/services.

use std::{collections::HashMap, sync::OnceLock};

/// Well-known service name of an "ip:port" endpoint, from /etc/services (TCP) or a short
/// built-in list when that file is missing.
pub fn service_of(endpoint: &str) -> Option<&'static str> {
    static SERVICES: OnceLock<HashMap<u16, &'static str>> = OnceLock::new();
    let port: u16 = endpoint.rsplit(':').next()?.parse().ok()?;
    SERVICES
        .get_or_init(|| {
            let mut m = HashMap::new();
            if let Ok(text) = std::fs::read_to_string("/etc/services") {
                for line in text.lines() {
                    let line = line.split('#').next().unwrap_or("");
                    let mut it = line.split_whitespace();
                    let (Some(name), Some(pp)) = (it.next(), it.next()) else {
                        continue;
                    };
                    if let Some(p) = pp.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) {
                        m.entry(p)
                            .or_insert_with(|| &*Box::leak(name.to_string().into_boxed_str()));
                    }
                }
            }
            for (p, n) in [
                (22, "ssh"),
                (53, "domain"),
                (80, "http"),
                (443, "https"),
                (3306, "mysql"),
                (5432, "postgresql"),
                (6379, "redis"),
                (8080, "http-alt"),
                (9092, "kafka"),
                (11211, "memcache"),
                (27017, "mongodb"),
            ] {
                m.entry(p).or_insert(n);
            }
            m
        })
        .get(&port)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services() {
        assert_eq!(service_of("10.0.0.1:5432"), Some("postgresql"));
        assert_eq!(service_of("[::1]:443"), Some("https"));
        assert_eq!(service_of("10.0.0.1:1"), service_of("10.0.0.1:1"));
    }
}
