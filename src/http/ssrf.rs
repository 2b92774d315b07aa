//! The SSRF guard. Webhook URLs come from SQL, so without a guard anyone who can create a
//! queue could make the database server call its own loopback services or the cloud
//! metadata endpoint. We refuse loopback, private, link-local (169.254.169.254 included),
//! shared, multicast and unspecified addresses after DNS resolution, unless
//! `queue_ext.http_allowlist` names the host or a network containing the address.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

#[derive(Debug, Default, Clone)]
pub struct Allowlist {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

impl Allowlist {
    /// Parses `'127.0.0.1, 10.0.0.0/8, hooks.internal'`. Entries that are neither a network
    /// nor an address are host names.
    pub fn parse(spec: &str) -> Allowlist {
        let mut list = Allowlist::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else {
                list.hosts.push(entry.to_ascii_lowercase());
            }
        }
        list
    }

    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// True for addresses on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local (fd00:ec2::254 metadata)
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

/// Why a request was refused; reqwest hands it back inside its error.
#[derive(Debug, thiserror::Error)]
#[error("SSRF guard refused {host}: {reason}")]
pub struct Refused {
    pub host: String,
    pub reason: String,
}

/// Checks a host that is an IP literal (reqwest does not resolve those).
pub fn check_literal(list: &Allowlist, host: &str) -> Result<(), Refused> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) if !list.allows_ip(ip) && !list.allows_host(bare) => Err(Refused {
            host: host.to_string(),
            reason:
                "address is loopback, private or link-local and not in queue_ext.http_allowlist"
                    .into(),
        }),
        _ => Ok(()),
    }
}

/// A DNS resolver for reqwest that drops refused addresses, so the connection can only go to
/// an address we checked (no time-of-check/time-of-use gap through a second lookup).
pub struct GuardedResolver {
    pub allowlist: Arc<RwLock<Allowlist>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let list = self.allowlist.read().map(|l| l.clone()).unwrap_or_default();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let host_ok = list.allows_host(&host);
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| host_ok || list.allows_ip(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused {
                    host,
                    reason: "resolves only to loopback, private or link-local addresses not in queue_ext.http_allowlist".into(),
                }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn refuses_private_and_metadata_addresses() {
        let none = Allowlist::parse("");
        for addr in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.3.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.1.1",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                !none.allows_ip(addr.parse().unwrap()),
                "{addr} should be refused"
            );
        }
        for addr in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(none.allows_ip(addr.parse().unwrap()), "{addr} should pass");
        }
    }

    #[test]
    fn allowlist_opens_networks_and_hosts() {
        let list = Allowlist::parse(" 127.0.0.1, 10.1.0.0/16 ,hooks.internal");
        assert!(list.allows_ip("127.0.0.1".parse().unwrap()));
        assert!(list.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(!list.allows_ip("10.2.0.1".parse().unwrap()));
        assert!(list.allows_host("HOOKS.internal."));
        assert!(check_literal(&list, "127.0.0.1").is_ok());
        assert!(check_literal(&Allowlist::default(), "169.254.169.254").is_err());
        assert!(check_literal(&Allowlist::default(), "[::1]").is_err());
        assert!(check_literal(&Allowlist::default(), "example.com").is_ok());
    }
}
