//! The SSRF guard. Webhook URLs come from SQL, so without a guard anyone who can create a
//! queue could make the database server call its own loopback services or the cloud
//! metadata endpoint. We refuse every address that is not on the public internet
//! (loopback, private, link-local with 169.254.169.254, shared, multicast, unspecified,
//! reserved) unless `queue_ext.http_allowlist` names the host or a network containing it.
//!
//! Every spelling of an address ends up here as an [`IpAddr`]: the `url` crate (WHATWG URL
//! parsing) already turns decimal, hex, octal and short IPv4 (`2130706433`, `0x7f000001`,
//! `0177.0.0.1`, `127.1`) into dotted quads and IPv6 into its canonical text, and host names
//! are checked after resolution by [`resolve`]. What the parser cannot know is that
//! some IPv6 ranges carry an IPv4 address inside (IPv4-mapped and -compatible, NAT64, 6to4,
//! SIIT): [`is_public`] judges those by the address they embed.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
            let bare = entry.trim_start_matches('[').trim_end_matches(']');
            if let Ok(net) = bare.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = bare.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else {
                list.hosts
                    .push(entry.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        list
    }

    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Public addresses pass; others only inside an allowlisted network. An IPv4-mapped
    /// address is the IPv4 address it maps (the kernel connects to that one over IPv4).
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        is_public(ip)
            || self
                .nets
                .iter()
                .any(|n| n.contains(&ip) || n.contains(&canonical))
    }
}

/// True for IPv4 addresses on the public internet.
fn is_public_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || o[0] == 0 // 0.0.0.0/8 "this network": Linux connects 0.x to the local host
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF assignments
        || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 192.88.99.0/24 6to4 relays
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240) // 240.0.0.0/4 reserved, 255.255.255.255
}

/// The IPv4 address an IPv6 address carries, for the ranges defined to carry one.
/// `Err(())` marks ranges that are reserved as a whole and never public.
fn embedded_v4(v6: Ipv6Addr) -> Option<Result<Ipv4Addr, ()>> {
    let s = v6.segments();
    let low32 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // ::ffff:a.b.c.d IPv4-mapped: connecting to it is connecting to a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(Ok(low32)),
        // ::ffff:0:a.b.c.d IPv4-translated (SIIT, RFC 7915).
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(Ok(low32)),
        // ::a.b.c.d IPv4-compatible (deprecated by RFC 4291): never a legitimate target, and
        // some stacks route it to a.b.c.d. `::` and `::1` are in here too.
        [0, 0, 0, 0, 0, 0, _, _] => Some(Err(())),
        // 64:ff9b::a.b.c.d NAT64 well-known prefix (RFC 6052): the gateway connects to a.b.c.d.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(Ok(low32)),
        // 64:ff9b:1::/48 local-use NAT64 (RFC 8215): the embedding is site-defined.
        [0x64, 0xff9b, 1, ..] => Some(Err(())),
        // 2002:AABB:CCDD::/48 6to4 (RFC 3056): the relay tunnels to AA.BB.CC.DD.
        [0x2002, hi, lo, ..] => Some(Ok(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        ))),
        _ => None,
    }
}

/// True for addresses on the public internet. IPv6 addresses that embed an IPv4 address are
/// judged by the address they embed.
pub fn is_public(ip: IpAddr) -> bool {
    let v6 = match ip {
        IpAddr::V4(v4) => return is_public_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    match embedded_v4(v6) {
        Some(Ok(v4)) => return is_public_v4(v4),
        Some(Err(())) => return false,
        None => {}
    }
    let s = v6.segments();
    !(v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast() // ff00::/8
        || s[0] <= 0x00ff // ::/8 reserved (what embedded_v4 did not place)
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // 100::/64 discard-only
        || (s[0] == 0x2001 && s[1] < 0x0200) // 2001::/23 IETF protocols (Teredo 2001::/32 too)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] & 0xfff0) == 0x3ff0 // 3fff::/20 documentation
        || s[0] == 0x5f00 // 5f00::/16 segment routing SIDs
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local (fd00:ec2::254 metadata)
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0) // fec0::/10 site-local (deprecated, still routed by some)
}

/// Why a request was refused. The text names no
/// host or address: it ends up in the job's `last_error`, which its producer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("SSRF guard refused the target: its address is not public (loopback, private, link-local or reserved) and not in queue_ext.http_allowlist")]
    Address,
    #[error("SSRF guard refused the target: its host name resolves only to addresses that are not public (loopback, private, link-local or reserved) and not in queue_ext.http_allowlist")]
    Resolved,
}

/// Parses a URL host as an IP literal: `[v6]` (as `Url::host_str` writes it) or dotted IPv4.
pub fn host_ip(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().ok()
}

/// Checks a host that is an IP literal (connected to without resolving it).
/// Host names pass here: [`resolve`] checks what they resolve to.
pub fn check_literal(list: &Allowlist, host: &str) -> Result<(), Refused> {
    match host_ip(host) {
        Some(ip) if !list.allows_ip(ip) => Err(Refused::Address),
        _ => Ok(()),
    }
}

/// Checks a parsed URL's host. The URL parser has already normalised every IPv4 spelling
/// to a dotted quad, so `host_str` of an IP host always parses here.
pub fn check_url(list: &Allowlist, url: &url::Url) -> Result<(), Refused> {
    match url.host_str() {
        Some(host) => check_literal(list, host),
        None => Err(Refused::Address),
    }
}

/// Why a host name gave no address to connect to.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("dns error: {0}")]
    Lookup(#[from] std::io::Error),
}

/// The addresses `host` resolves to that the guard lets through, with `port`: the connection
/// can only go to an address checked here (no time-of-check/time-of-use gap through a second
/// lookup).
pub async fn resolve(
    list: &Allowlist,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let addrs = tokio::net::lookup_host((host, port)).await?;
    let host_ok = list.allows_host(host);
    let allowed: Vec<SocketAddr> = addrs
        .filter(|a| host_ok || list.allows_ip(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(Refused::Resolved.into());
    }
    Ok(allowed)
}

#[cfg(test)]
mod unit {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The host a URL ends up with, after the `url` crate's normalisation.
    fn host_of(url: &str) -> String {
        url::Url::parse(url)
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .host_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn refuses_private_and_metadata_addresses() {
        let none = Allowlist::parse("");
        for addr in [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.3.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.1.1",
            "192.0.0.170",
            "192.88.99.1",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001:db8::1",
            "2001::1",   // Teredo
            "2001:2::1", // benchmarking
            "3fff::1",
            "5f00::1",
            "1::1", // ::/8 reserved
        ] {
            assert!(!none.allows_ip(ip(addr)), "{addr} should be refused");
        }
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "2a00:1450:4001::1",
        ] {
            assert!(none.allows_ip(ip(addr)), "{addr} should pass");
        }
    }

    #[test]
    fn ipv6_forms_embedding_ipv4_are_judged_by_the_ipv4_address() {
        let none = Allowlist::parse("");
        for addr in [
            "::ffff:127.0.0.1", // IPv4-mapped
            "::ffff:7f00:1",    // the same, hex
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1", // IPv4-compatible
            "::7f00:1",
            "::8.8.8.8",          // IPv4-compatible is refused whatever it embeds
            "::ffff:0:127.0.0.1", // SIIT
            "64:ff9b::127.0.0.1", // NAT64
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "64:ff9b:1::1",       // local-use NAT64
            "2002:7f00:1::",      // 6to4 of 127.0.0.1
            "2002:a00:1::1",      // 6to4 of 10.0.0.1
            "2002:a9fe:a9fe::1",  // 6to4 of 169.254.169.254
        ] {
            assert!(!none.allows_ip(ip(addr)), "{addr} should be refused");
        }
        for addr in [
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:5db8:d822::1", // 6to4 of 93.184.216.34
        ] {
            assert!(none.allows_ip(ip(addr)), "{addr} should pass");
        }
    }

    #[test]
    fn the_url_parser_normalises_every_ipv4_spelling() {
        // What the `url` crate does for us; the guard relies on it, so pin it.
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0X7F000001/",
            "http://0177.0.0.1/",
            "http://0177.0.0.01/",
            "http://0x7f.0.0.1/",
            "http://127.1/",
            "http://127.0.1/",
            "http://0x7f.1/",
            "http://127.0.0.1./",
            "http://%31%32%37.0.0.1/",
            "http://\u{ff11}\u{ff12}\u{ff17}.0.0.1/", // full-width digits
            "http://127\u{3002}0\u{3002}0\u{3002}1/", // ideographic full stops
            "http://127%2e0%2e0%2e1/",
            "http://0x7F.0x0.0x0.0x1/",
            "http://00000000000000000177.1/",
            "https://user:pw@127.0.0.1:8443/x?y#z",
        ] {
            assert_eq!(host_of(url), "127.0.0.1", "{url}");
        }
        assert_eq!(host_of("http://0/"), "0.0.0.0");
        assert_eq!(host_of("http://0x0/"), "0.0.0.0");
        assert_eq!(host_of("http://[::ffff:127.0.0.1]/"), "[::ffff:7f00:1]");
        assert_eq!(host_of("http://[::127.0.0.1]/"), "[::7f00:1]");
        assert_eq!(host_of("http://[0:0:0:0:0:0:0:1]/"), "[::1]");
        assert_eq!(host_of("http://[::]/"), "[::]");
        // Out-of-range numbers are not hosts at all.
        assert!(url::Url::parse("http://4294967296/").is_err());
        assert!(url::Url::parse("http://0x100000000/").is_err());
    }

    #[test]
    fn every_spelling_of_a_private_address_is_refused() {
        let none = Allowlist::parse("");
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "http://0/",
            "http://0.0.0.0/",
            "http://3232235777/", // 192.168.1.1
            "http://0xa9fea9fe/", // 169.254.169.254
            "http://[::]/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[::ffff:0:127.0.0.1]/",
            "http://[64:ff9b::127.0.0.1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::1]/",
            "http://[fe80::1]/",
            "https://[fd00:ec2::254]/latest/meta-data/",
        ] {
            let parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(
                check_url(&none, &parsed),
                Err(Refused::Address),
                "{url} should be refused"
            );
        }
        for url in [
            "http://93.184.216.34/",
            "http://1572395042/", // 93.184.216.34
            "http://[2606:4700::1111]/",
            "http://example.com/", // names are checked by the resolver
        ] {
            let parsed = url::Url::parse(url).unwrap();
            assert_eq!(check_url(&none, &parsed), Ok(()), "{url} should pass");
        }
    }

    #[test]
    fn allowlist_opens_networks_and_hosts() {
        let list = Allowlist::parse(" 127.0.0.1, 10.1.0.0/16 ,hooks.internal, [::1]");
        assert!(list.allows_ip(ip("127.0.0.1")));
        assert!(
            list.allows_ip(ip("::ffff:127.0.0.1")),
            "mapped form of an allowed address"
        );
        assert!(!list.allows_ip(ip("127.0.0.2")));
        assert!(list.allows_ip(ip("10.1.2.3")));
        assert!(!list.allows_ip(ip("10.2.0.1")));
        assert!(list.allows_ip(ip("::1")));
        assert!(list.allows_host("HOOKS.internal."));
        assert!(!list.allows_host("other.internal"));
        assert!(check_literal(&list, "127.0.0.1").is_ok());
        assert!(check_literal(&list, "[::1]").is_ok());
        assert!(check_literal(&Allowlist::default(), "169.254.169.254").is_err());
        assert!(check_literal(&Allowlist::default(), "[::1]").is_err());
        assert!(check_literal(&Allowlist::default(), "example.com").is_ok());
    }

    #[test]
    fn refusals_name_no_host() {
        for r in [Refused::Address, Refused::Resolved] {
            let text = r.to_string();
            assert!(text.starts_with("SSRF guard refused the target"), "{text}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        let closed = Allowlist::parse("");
        match resolve(&closed, "localhost", 80).await {
            Err(ResolveError::Refused(Refused::Resolved)) => {}
            other => panic!("localhost: {other:?}"),
        }
        let open = Allowlist::parse("127.0.0.1");
        let addrs = resolve(&open, "localhost", 8080).await.unwrap();
        // Only the address that was checked is connected to (::1 is dropped).
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip() == ip("127.0.0.1") && a.port() == 8080),
            "{addrs:?}"
        );
    }
}
