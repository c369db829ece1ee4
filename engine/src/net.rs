//! CIDR networks for `trusted_proxies`, the client address they imply, and the grouping of
//! addresses that per-IP limits count under.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use protocol::http::RequestHead;

/// An IPv4 or IPv6 network such as `10.0.0.0/8` or `::1/128` (a bare address is a /32 or /128),
/// over `ipnet`'s arithmetic; IPv4-mapped IPv6 addresses count as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let net = if text.contains('/') {
            text.parse::<ipnet::IpNet>().ok()
        } else {
            text.parse::<IpAddr>().ok().map(ipnet::IpNet::from)
        };
        net.map(Cidr)
            .ok_or_else(|| format!("`{text}` is not a CIDR such as 10.0.0.0/8 or ::1/128"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.addr(), self.0.prefix_len())
    }
}

/// The group a per-IP limit counts an address under: the address itself for IPv4 (an
/// IPv4-mapped IPv6 address counts as its IPv4 address), the /64 for IPv6 (one host usually holds
/// a whole /64, so per-address keys would be no limit at all).
pub fn ip_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// The client of an HTTP request: [`client_ip`] over every `X-Forwarded-For` line of its head.
pub(crate) fn request_client_ip(peer: IpAddr, head: &RequestHead, trusted: &[Cidr]) -> IpAddr {
    let lines: Vec<&[u8]> = head.headers_named("x-forwarded-for").collect();
    client_ip(peer, lines.into_iter(), trusted)
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is read from the right, skipping trusted hops; the first untrusted address is
/// the client. `forwarded_for` holds every header line in the order received: they are one list
/// (RFC 9110 §5.3), so a proxy that appends its own line cannot be outflanked by a line the client
/// wrote before it. A malformed entry (or a line that is not UTF-8) stops the walk at the last
/// address believed.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let mut hops = 0;
    for line in forwarded_for.rev() {
        let Ok(line) = std::str::from_utf8(line) else {
            return client;
        };
        for hop in line.rsplit(',') {
            hops += 1;
            if hops > 32 {
                return client;
            }
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip;
            if !is_trusted(ip) {
                return client;
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "192.0.2.7".parse().unwrap();
        let one = |v: &'static str| [v.as_bytes()].into_iter();
        let xff = "203.0.113.9, 10.0.0.4";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_ip(proxy, one(xff), &trusted), ip("203.0.113.9"));
        assert_eq!(client_ip(stranger, one(xff), &trusted), stranger);
        assert_eq!(client_ip(proxy, one(xff), &[]), proxy);
        assert_eq!(client_ip(proxy, std::iter::empty(), &trusted), proxy);
        assert_eq!(
            client_ip(proxy, one("garbage, 198.51.100.1"), &trusted),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn every_forwarded_for_line_counts_in_order() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The client wrote the first line; the proxy appended the second: the client is the
        // address the proxy saw, not the one the client claimed.
        let lines: [&[u8]; 2] = [b"198.51.100.1", b"203.0.113.66"];
        assert_eq!(
            client_ip(proxy, lines.into_iter(), &trusted),
            ip("203.0.113.66")
        );
        // Trusted hops are skipped across lines too.
        let lines: [&[u8]; 3] = [b"203.0.113.66", b"10.0.0.7, 10.0.0.8", b"10.0.0.9"];
        assert_eq!(
            client_ip(proxy, lines.into_iter(), &trusted),
            ip("203.0.113.66")
        );
        // A line that is not UTF-8 stops the walk where it is.
        let lines: [&[u8]; 2] = [b"198.51.100.1", b"\xff\xfe"];
        assert_eq!(client_ip(proxy, lines.into_iter(), &trusted), proxy);
    }

    #[test]
    fn ipv6_groups_by_64_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ip_group(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(ip_group(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(ip_group(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            ip_group(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip_group(ip("2001:db8:1:2::7"))
        );
        assert_ne!(
            ip_group(ip("2001:db8:1:3::1")),
            ip_group(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn contains() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }
}
