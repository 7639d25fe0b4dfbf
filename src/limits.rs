//! Per-client token buckets (tower-governor) and the client key: the peer address, or the
//! right-most X-Forwarded-For hop when the peer is a configured trusted proxy. IPv6 clients are
//! keyed by their /64. Over-limit answers are the contract's `429 rate_limited` with Retry-After.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use governor::clock::QuantaInstant;
use governor::middleware::NoOpMiddleware;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use crate::config::Bucket;
use crate::http::error::error_body;

/// A network (address or CIDR) whose forwarded headers are believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (a, p) = s
            .split_once('/')
            .map(|(a, p)| (a, Some(p)))
            .unwrap_or((s, None));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("bad trusted proxy `{s}`"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| anyhow::anyhow!("bad prefix in `{s}`"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                mask(u32::from(n) as u128, 32, self.prefix)
                    == mask(u32::from(i) as u128, 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                mask(u128::from(n), 128, self.prefix) == mask(u128::from(i), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn mask(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits >> (width - prefix)
    }
}

/// The rate-limit key of a client.
#[derive(Clone, Debug)]
pub struct ClientKey {
    pub trusted: Arc<Vec<Net>>,
}

impl ClientKey {
    /// From `limits.trusted_proxies` (addresses or CIDR networks).
    pub fn from_config(trusted: &[String]) -> anyhow::Result<Self> {
        let nets = trusted
            .iter()
            .map(|p| Net::parse(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            trusted: Arc::new(nets),
        })
    }

    /// The client address for a request from `peer` with these headers.
    pub fn client_ip(&self, peer: IpAddr, forwarded: Option<&str>) -> IpAddr {
        let mut ip = peer;
        if self.trusted.iter().any(|n| n.contains(peer)) {
            // Walk X-Forwarded-For from the right: skip our own proxies, take the first other hop.
            if let Some(list) = forwarded {
                for hop in list.rsplit(',') {
                    match hop.trim().parse::<IpAddr>() {
                        Ok(h) if self.trusted.iter().any(|n| n.contains(h)) => continue,
                        Ok(h) => {
                            ip = h;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        bucket_key(ip)
    }
}

/// IPv6 addresses count by /64 (one household or host gets many addresses).
pub fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

impl KeyExtractor for ClientKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .ok_or(GovernorError::UnableToExtractKey)?;
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        Ok(self.client_ip(peer, forwarded))
    }
}

pub type Limiter = GovernorConfig<ClientKey, NoOpMiddleware<QuantaInstant>>;

/// A bucket's governor configuration.
pub fn config(bucket: Bucket, key: &ClientKey) -> Arc<Limiter> {
    // One token every 60/per_minute seconds (`period`: governor's `per_second(n)` means one token every n seconds).
    let period = Duration::from_millis((60_000 / bucket.per_minute.max(1) as u64).max(1));
    Arc::new(
        GovernorConfigBuilder::default()
            .period(period)
            .burst_size(bucket.burst.max(1))
            .key_extractor(key.clone())
            .finish()
            .expect("period and burst are positive"),
    )
}

/// The layer for one bucket, answering over-limit requests in the contract's words.
pub fn layer(
    name: &'static str,
    cfg: Arc<Limiter>,
) -> GovernorLayer<ClientKey, NoOpMiddleware<QuantaInstant>, Body> {
    GovernorLayer::new(cfg).error_handler(move |e| rate_limited(name, e))
}

fn rate_limited(bucket: &'static str, e: GovernorError) -> Response<Body> {
    match e {
        GovernorError::TooManyRequests { wait_time, .. } => {
            metrics::counter!("moss_rate_limited_total", "bucket" => bucket).increment(1);
            // governor rounds the wait down to whole seconds: round up, never 0.
            let retry = wait_time + 1;
            let mut r = error_body(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests, please slow down.",
                "请求过于频繁，请稍后再试。",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            // Counted for the dashboard by the layer that sees every response.
            r.extensions_mut()
                .insert(crate::tally::Outcome::RateLimited);
            r
        }
        _ => error_body(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "The client address is unknown.",
            "无法识别客户端地址。",
        ),
    }
}

/// Forgets idle clients now and then so the key maps stay small under many distinct clients.
pub fn spawn_cleanup(limiters: Vec<Arc<Limiter>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            for l in &limiters {
                l.limiter().retain_recent();
                l.limiter().shrink_to_fit();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(trusted: &[&str]) -> ClientKey {
        ClientKey {
            trusted: Arc::new(trusted.iter().map(|t| Net::parse(t).unwrap()).collect()),
        }
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        // not a proxy: the header is the client's own invention
        assert_eq!(key(&[]).client_ip(peer, Some("1.2.3.4")), peer);
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let k = key(&["10.0.0.0/8"]);
        // the right-most hop the proxy added wins, not the left-most one the client wrote
        assert_eq!(
            k.client_ip(proxy, Some("6.6.6.6, 198.51.100.7")),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            k.client_ip(proxy, Some("198.51.100.7, 10.0.0.3")),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(k.client_ip(proxy, None), proxy);
        assert_eq!(k.client_ip(proxy, Some("garbage")), proxy);
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a = bucket_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = bucket_key("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = bucket_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            bucket_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert!(Net::parse("10.0.0.0/33").is_err());
    }
}
