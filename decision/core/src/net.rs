//! Client addresses: CIDR tables built once at policy load (longest-prefix lookups by hashing
//! each prefix length present), and the client IP behind trusted proxies
//! (the right-most X-Forwarded-For hop that is not itself a trusted proxy).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

/// An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`) is the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A set of networks, each tagged with a bit mask; a lookup ORs the masks of every network
/// that holds the address. One hash map per prefix length in use, so a lookup costs at most
/// as many hash probes as there are distinct prefix lengths in the policy.
#[derive(Debug, Clone, Default)]
pub struct CidrTable {
    v4: Vec<(u8, HashMap<u32, u64>)>,
    v6: Vec<(u8, HashMap<u128, u64>)>,
}

fn mask4(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
}

fn mask6(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

impl CidrTable {
    pub fn insert(&mut self, net: IpNet, bits: u64) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = u32::from(n.network()) & mask4(len);
                let slot = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(i) => i,
                    None => {
                        self.v4.push((len, HashMap::new()));
                        self.v4.len() - 1
                    }
                };
                *self.v4[slot].1.entry(key).or_insert(0) |= bits;
            }
            IpNet::V6(n) => {
                // An IPv4-mapped network is stored as the IPv4 network it denotes.
                if let Some(v4) = n.network().to_ipv4_mapped()
                    && n.prefix_len() >= 96
                    && let Ok(n4) = ipnet::Ipv4Net::new(v4, n.prefix_len() - 96)
                {
                    return self.insert(IpNet::V4(n4), bits);
                }
                let len = n.prefix_len();
                let key = u128::from(n.network()) & mask6(len);
                let slot = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(i) => i,
                    None => {
                        self.v6.push((len, HashMap::new()));
                        self.v6.len() - 1
                    }
                };
                *self.v6[slot].1.entry(key).or_insert(0) |= bits;
            }
        }
    }

    /// The OR of the bits of every network that contains `ip` (0: none).
    pub fn lookup(&self, ip: IpAddr) -> u64 {
        let mut bits = 0;
        match canonical(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for (len, map) in &self.v4 {
                    if let Some(b) = map.get(&(a & mask4(*len))) {
                        bits |= b;
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for (len, map) in &self.v6 {
                    if let Some(b) = map.get(&(a & mask6(*len))) {
                        bits |= b;
                    }
                }
            }
        }
        bits
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.lookup(ip) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Parses a CIDR (`10.0.0.0/8`) or a bare address (a /32 or /128). A network written with
/// host bits set (`10.0.0.1/8`) is refused: it is almost always a typo.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet =
        s.parse().map_err(|_| format!("invalid CIDR {s:?}: expected e.g. \"10.0.0.0/8\" or \"::1/128\""))?;
    if net.trunc() != net {
        return Err(format!("invalid CIDR {s:?}: host bits are set (did you mean \"{}\"?)", net.trunc()));
    }
    Ok(net)
}

/// Most X-Forwarded-For hops walked; a longer chain of trusted proxies is refused as malformed.
pub const MAX_FORWARDED_HOPS: usize = 64;

/// Why a forwarded-for chain could not be read (the request gets a 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedForError;

/// Parses one X-Forwarded-For hop: `1.2.3.4`, `1.2.3.4:567`, `::1`, `[::1]` or `[::1]:567`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok())) {
            return None;
        }
        return inside.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client address of a request that reached us from `peer`.
///
/// X-Forwarded-For is believed only when the peer is a trusted proxy; then the hops are read
/// from the right (each proxy appends the address it saw) and the first one that is not itself a
/// trusted proxy is the client. Hops left of it were written by the client and prove nothing.
/// When every hop is a trusted proxy, the left-most is the client. A hop that is not an address
/// is refused, never passed over: passing over it would hand the client the trust of the proxy.
/// Empty list elements (`a,,b`, a trailing `,`, only spaces or tabs between commas) are not
/// hops: RFC 9110 section 5.6.1 says a recipient ignores them, and several headers joined into
/// one (as Envoy joins repeated headers) can leave them behind.
pub fn client_ip(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted_proxies: &CidrTable,
) -> Result<IpAddr, ForwardedForError> {
    let peer = canonical(peer);
    if !trusted_proxies.contains(peer) {
        return Ok(peer);
    }
    let Some(xff) = forwarded_for.filter(|v| !v.trim().is_empty()) else {
        return Ok(peer);
    };
    let mut client = peer;
    let hops = xff.rsplit(',').filter(|h| !h.trim_matches([' ', '\t']).is_empty());
    for (n, hop) in hops.enumerate() {
        if n == MAX_FORWARDED_HOPS {
            return Err(ForwardedForError);
        }
        let ip = canonical(parse_hop(hop).ok_or(ForwardedForError)?);
        client = ip;
        if !trusted_proxies.contains(ip) {
            break;
        }
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn table(nets: &[(&str, u64)]) -> CidrTable {
        let mut t = CidrTable::default();
        for (n, b) in nets {
            t.insert(parse_cidr(n).expect("test cidr"), *b);
        }
        t
    }

    #[test]
    fn lookups_or_the_bits_of_every_containing_network() {
        let t = table(&[
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 2),
            ("203.0.113.0/24", 4),
            ("::1/128", 1),
            ("2001:db8::/32", 8),
        ]);
        let cases = [
            ("10.2.3.4", 1),
            ("10.1.3.4", 3),
            ("203.0.113.255", 4),
            ("203.0.114.1", 0),
            ("::1", 1),
            ("2001:db8:1::5", 8),
            ("::ffff:10.1.0.1", 3),
            ("8.8.8.8", 0),
        ];
        for (a, want) in cases {
            assert_eq!(t.lookup(ip(a)), want, "{a}");
        }
    }

    #[test]
    fn cidr_parsing_refuses_typos() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("127.0.0.1").is_ok());
        assert!(parse_cidr("::1/128").is_ok());
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("300.0.0.0/8").is_err());
        assert!(parse_cidr("internal").is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = table(&[("127.0.0.1/32", 1), ("10.9.0.0/16", 1)]);
        let cases: &[(&str, Option<&str>, Result<&str, ForwardedForError>)] = &[
            // an untrusted peer's header is ignored, whatever it claims
            ("8.8.8.8", Some("10.0.0.1"), Ok("8.8.8.8")),
            ("8.8.8.8", Some("garbage"), Ok("8.8.8.8")),
            // a trusted peer: the right-most untrusted hop
            ("127.0.0.1", Some("8.8.8.8"), Ok("8.8.8.8")),
            ("127.0.0.1", Some("8.8.8.8, 127.0.0.1"), Ok("8.8.8.8")),
            ("127.0.0.1", Some("1.1.1.1, 8.8.8.8, 10.9.0.7"), Ok("8.8.8.8")),
            // spoofed hops left of the real client prove nothing
            ("127.0.0.1", Some("10.9.0.1, 203.0.113.9"), Ok("203.0.113.9")),
            // every hop trusted: the left-most
            ("127.0.0.1", Some("10.9.0.3, 127.0.0.1"), Ok("10.9.0.3")),
            ("127.0.0.1", None, Ok("127.0.0.1")),
            ("127.0.0.1", Some(""), Ok("127.0.0.1")),
            // ports and brackets
            ("127.0.0.1", Some("8.8.8.8:443"), Ok("8.8.8.8")),
            ("127.0.0.1", Some("[2001:db8::1]:443"), Ok("2001:db8::1")),
            ("::ffff:127.0.0.1", Some("::ffff:8.8.4.4"), Ok("8.8.4.4")),
            // a hop that is not an address would hand the client our trust: refused
            ("127.0.0.1", Some("unknown, 127.0.0.1"), Err(ForwardedForError)),
            ("127.0.0.1", Some("8.8.8.8, garbage"), Err(ForwardedForError)),
            // empty list elements are ignored (RFC 9110 section 5.6.1), wherever they are
            ("127.0.0.1", Some("198.51.100.7,"), Ok("198.51.100.7")),
            ("127.0.0.1", Some("8.8.8.8,,"), Ok("8.8.8.8")),
            ("127.0.0.1", Some(", 8.8.8.8"), Ok("8.8.8.8")),
            ("127.0.0.1", Some("1.1.1.1, ,\t, 8.8.8.8 , 127.0.0.1,"), Ok("8.8.8.8")),
            ("127.0.0.1", Some(" , ,"), Ok("127.0.0.1")),
            ("127.0.0.1", Some("10.9.0.3,,127.0.0.1"), Ok("10.9.0.3")),
        ];
        let long: Vec<&str> = std::iter::repeat_n("10.9.0.1", MAX_FORWARDED_HOPS + 1).collect();
        assert_eq!(
            client_ip(ip("127.0.0.1"), Some(&long.join(",")), &trusted),
            Err(ForwardedForError),
            "an endless chain of trusted hops"
        );
        for (peer, xff, want) in cases {
            let got = client_ip(ip(peer), *xff, &trusted);
            assert_eq!(got, want.clone().map(ip), "peer {peer} xff {xff:?}");
        }
    }
}
