//! The daemon's HTTP endpoint (`--metrics-addr`, default
//! [`DEFAULT_ADDR`]): `/metrics` in Prometheus text format
//! (prometheus-client) and `/healthz/ready`.
//!
//! Series:
//!
//! * `divert_connections_total{namespace, pod, netns_cookie, destination,
//!   port, verdict}`: connects per destination and verdict (`redirected`,
//!   `inbound_capture`, `passthrough`), from the kernel's `COUNTERS`. `namespace` and `pod` are empty until the
//!   daemon knows the pod (Kubernetes).
//! * `divert_sent_bytes_total` and `divert_received_bytes_total`, same
//!   labels: payload bytes of those connections, each direction, added when
//!   a connection closes.
//! * `divert_registered_namespaces`: namespaces with a policy.
//! * `divert_meshed_pods_unregistered`: meshed pods the pod watch could not
//!   register (each also gets a `DivertNotRegistered` Event).
//!
//! Cardinality is bounded per network namespace: the first `top`
//! (`--metrics-top`) destinations (address and port) seen for a namespace
//! get their own series for as long as it is registered; every later one is
//! added to the namespace's `destination="other",port=""` series of its
//! verdict. Membership never changes, so every series only grows. When a
//! namespace is unregistered or collected, its series go.
//!
//! The kernel's counter map is an LRU: a series it evicts starts again from
//! zero. Each scrape adds the growth since the last one; a kernel value
//! below the last one seen is taken as a restart after eviction (its whole
//! value is added), so what was counted is never lost, though connections
//! counted between an eviction and the next scrape can be.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as PromRegistry,
};

use super::Readiness;
use crate::ebpf;
use crate::ebpf::Maps;

/// Default listen address: loopback of the node (the DaemonSet runs with
/// `hostNetwork`), a port no Istio component uses.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15016";
/// Default number of destinations with their own series per namespace.
pub const DEFAULT_TOP: usize = 20;
/// The `destination` label of the folded series.
pub const OTHER: &str = "other";

/// Labels of `divert_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub namespace: String,
    pub pod: String,
    pub netns_cookie: String,
    pub destination: String,
    pub port: String,
    pub verdict: String,
}

type Key = (u64, IpAddr, u16, &'static str);

#[derive(Default)]
struct State {
    /// The kernel values last seen per series key: connections, bytes sent,
    /// bytes received.
    last: HashMap<Key, [u64; 3]>,
    /// Per namespace, the destinations with their own series.
    exposed: HashMap<u64, BTreeSet<(IpAddr, u16)>>,
    /// Per namespace, every label set written (to remove them together,
    /// whatever is known of the pod by then).
    series: HashMap<u64, HashSet<ConnectionLabels>>,
}

/// The metrics of one daemon.
pub struct Metrics {
    registry: PromRegistry,
    /// `divert_connections_total`, `divert_sent_bytes_total`,
    /// `divert_received_bytes_total`.
    families: [Family<ConnectionLabels, Counter>; 3],
    registered: Gauge,
    unregistered_pods: Gauge,
    top: usize,
    state: Mutex<State>,
}

impl Metrics {
    pub fn new(top: usize) -> Metrics {
        let mut registry = PromRegistry::default();
        let families: [Family<ConnectionLabels, Counter>; 3] = Default::default();
        for (family, name, help) in [
            (
                &families[0],
                "divert_connections",
                "Outbound TCP connects judged by divert, per destination and verdict",
            ),
            (
                &families[1],
                "divert_sent_bytes",
                "Payload bytes sent (and acknowledged) on those connections, counted when they close",
            ),
            (
                &families[2],
                "divert_received_bytes",
                "Payload bytes received on those connections, counted when they close",
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        let registered = Gauge::default();
        registry.register(
            "divert_registered_namespaces",
            "Network namespaces with a registered policy",
            registered.clone(),
        );
        let unregistered_pods = Gauge::default();
        registry.register(
            "divert_meshed_pods_unregistered",
            "Meshed pods the pod watch could not register (reported with a DivertNotRegistered Event, tried again)",
            unregistered_pods.clone(),
        );
        Metrics {
            registry,
            families,
            registered,
            unregistered_pods,
            top,
            state: Mutex::new(State::default()),
        }
    }

    /// The `divert_meshed_pods_unregistered` gauge, which the pod watch
    /// sets.
    pub fn unregistered_pods(&self) -> Gauge {
        self.unregistered_pods.clone()
    }

    /// Fold the kernel's counters (and the registered namespaces, with their
    /// pod identity when known) into the series.
    pub fn update(
        &self,
        counters: &[ebpf::Counter],
        registered: &[u64],
        identity: &BTreeMap<u64, ebpf::PodRef>,
    ) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.registered.set(registered.len() as i64);
        let live: BTreeSet<u64> = registered.iter().copied().collect();
        // Namespaces gone: drop their series and bookkeeping.
        let gone: Vec<u64> = st
            .series
            .keys()
            .chain(st.exposed.keys())
            .copied()
            .filter(|c| !live.contains(c))
            .collect();
        for c in gone {
            for labels in st.series.remove(&c).unwrap_or_default() {
                for f in &self.families {
                    f.remove(&labels);
                }
            }
            st.exposed.remove(&c);
            st.last.retain(|k, _| k.0 != c);
        }
        for k in counters.iter().filter(|k| live.contains(&k.netns_cookie)) {
            let key: Key = (k.netns_cookie, k.destination, k.port, k.verdict);
            let now = [k.connections, k.bytes_sent, k.bytes_received];
            let last = st.last.insert(key, now).unwrap_or_default();
            // A value below the last one seen: the LRU evicted the series
            // and it started again from zero.
            let evicted = now.iter().zip(&last).any(|(n, l)| n < l);
            let delta = |i: usize| if evicted { now[i] } else { now[i] - last[i] };
            let exposed = st.exposed.entry(k.netns_cookie).or_default();
            let own = exposed.contains(&(k.destination, k.port))
                || (exposed.len() < self.top && exposed.insert((k.destination, k.port)));
            let (destination, port) = if own {
                (k.destination.to_string(), k.port.to_string())
            } else {
                (OTHER.to_string(), String::new())
            };
            let (namespace, pod) = identity
                .get(&k.netns_cookie)
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .unwrap_or_default();
            let labels = ConnectionLabels {
                namespace,
                pod,
                netns_cookie: k.netns_cookie.to_string(),
                destination,
                port,
                verdict: k.verdict.to_string(),
            };
            // get_or_create even for a zero delta, so the series exists.
            for (i, f) in self.families.iter().enumerate() {
                f.get_or_create(&labels).inc_by(delta(i));
            }
            st.series.entry(k.netns_cookie).or_default().insert(labels);
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Metrics {
    /// Read the kernel's counters, the registered namespaces and their pods
    /// from `maps` into these metrics. `maps` is a read-only handle of its
    /// own on the daemon's maps ([`crate::ebpf::pinned::open_maps`]): a
    /// scrape never takes the registry's lock, so it never holds up a
    /// registration.
    pub fn refresh(&self, maps: &Maps) -> anyhow::Result<()> {
        let counters = maps.counters()?;
        let registered = maps.registered_cookies()?;
        let identity = maps.pods()?;
        self.update(&counters, &registered, &identity);
        Ok(())
    }
}

/// At most this many HTTP connections are open at once; one more is closed
/// as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection must have sent a request's headers this long after it
/// opened (or after its last response).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection is kept longer than this, busy or idle (Prometheus and the
/// kubelet connect again).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Bind the HTTP endpoint's address. Done before anything touches the
/// kernel, so an address in use fails the start with nothing left behind.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening for metrics on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serve `/metrics` and `/healthz/ready` on `listener` (from [`bind`]),
/// HTTP/1.1 (hyper), until `shutdown` is cancelled: one task per
/// connection, at most [`MAX_CONNECTIONS`], each closed after
/// [`HEADER_TIMEOUT`] without a request or [`CONNECTION_LIFETIME`] in all.
/// `/healthz/ready` answers 200 while `ready` holds (registrations are
/// served by this daemon), 503 otherwise.
pub async fn serve(
    listener: std::net::TcpListener,
    maps: Arc<Maps>,
    metrics: Arc<Metrics>,
    ready: Readiness,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).context("the metrics listener")?;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the metrics endpoint");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let (maps, metrics, ready) = (maps.clone(), metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (maps, metrics, ready) = (maps.clone(), metrics.clone(), ready.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(respond(&req, maps, metrics, &ready).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

type Reply = hyper::Response<http_body_util::Full<hyper::body::Bytes>>;

fn reply(status: u16, content_type: &str, body: String) -> Reply {
    hyper::Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(http_body_util::Full::new(body.into()))
        .expect("a valid response")
}

async fn respond<B>(
    req: &hyper::Request<B>,
    maps: Arc<Maps>,
    metrics: Arc<Metrics>,
    ready: &Readiness,
) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            // Reading the maps blocks: off the runtime's thread.
            let read = tokio::task::spawn_blocking(move || {
                metrics.refresh(&maps).map(|()| metrics.render())
            })
            .await;
            match read {
                Ok(Ok(text)) => reply(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Ok(Err(e)) => reply(500, TEXT, format!("reading the maps: {e:#}\n")),
                Err(e) => reply(500, TEXT, format!("reading the maps: {e}\n")),
            }
        }
        (&hyper::Method::GET, "/healthz/ready") if ready.ready() => reply(200, TEXT, "ok\n".into()),
        (&hyper::Method::GET, "/healthz/ready") => reply(
            503,
            TEXT,
            format!(
                "registrations are not served: {} is not this daemon's socket\n",
                ready.path.display()
            ),
        ),
        _ => reply(404, TEXT, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(netns: u64, dst: &str, port: u16, verdict: &'static str, n: u64) -> ebpf::Counter {
        ebpf::Counter {
            netns_cookie: netns,
            destination: dst.parse().unwrap(),
            port,
            verdict,
            connections: n,
            bytes_sent: 10 * n,
            bytes_received: 100 * n,
        }
    }

    fn series(text: &str, name: &str, needle: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn value(text: &str, needle: &str) -> Option<u64> {
        series(text, "divert_connections_total", needle)
    }

    #[test]
    fn destinations_beyond_the_top_fold_and_every_series_only_grows() {
        let m = Metrics::new(2);
        let id = BTreeMap::from([(
            7,
            ebpf::PodRef {
                namespace: "shop".into(),
                name: "cart-1".into(),
            },
        )]);
        m.update(
            &[
                c(7, "10.0.0.1", 80, "redirected", 5),
                c(7, "10.0.0.2", 80, "redirected", 3),
                c(7, "10.0.0.3", 443, "passthrough", 2),
                c(7, "10.0.0.4", 443, "passthrough", 1),
            ],
            &[7],
            &id,
        );
        let t = m.render();
        assert_eq!(
            value(&t, r#"destination="10.0.0.1",port="80""#),
            Some(5),
            "{t}"
        );
        assert_eq!(
            value(&t, r#"destination="10.0.0.2",port="80""#),
            Some(3),
            "{t}"
        );
        assert_eq!(
            value(&t, r#"destination="other",port="",verdict="passthrough""#),
            Some(3),
            "{t}"
        );
        let other_pass = r#"destination="other",port="",verdict="passthrough""#;
        assert_eq!(series(&t, "divert_sent_bytes_total", other_pass), Some(30));
        assert_eq!(
            series(&t, "divert_received_bytes_total", other_pass),
            Some(300)
        );
        assert!(t.contains(r#"namespace="shop",pod="cart-1""#), "{t}");
        assert!(t.contains("divert_registered_namespaces 1"), "{t}");
        // Growth is added; an evicted-and-restarted kernel series (10.0.0.2
        // back at 1) adds its whole value.
        m.update(
            &[
                c(7, "10.0.0.1", 80, "redirected", 9),
                c(7, "10.0.0.2", 80, "redirected", 1),
                c(7, "10.0.0.3", 443, "passthrough", 2),
                c(7, "10.0.0.4", 443, "passthrough", 4),
            ],
            &[7],
            &id,
        );
        let t = m.render();
        assert_eq!(
            value(&t, r#"destination="10.0.0.1",port="80""#),
            Some(9),
            "{t}"
        );
        assert_eq!(
            value(&t, r#"destination="10.0.0.2",port="80""#),
            Some(4),
            "{t}"
        );
        assert_eq!(
            value(&t, r#"destination="other",port="",verdict="passthrough""#),
            Some(6),
            "{t}"
        );
        assert_eq!(
            series(
                &t,
                "divert_received_bytes_total",
                r#"destination="10.0.0.2""#
            ),
            Some(400),
            "{t}"
        );
        // Unregistered (and its identity already forgotten): its series go.
        m.update(&[], &[], &BTreeMap::new());
        let t = m.render();
        assert!(!t.contains("netns_cookie=\"7\""), "{t}");
        assert!(t.contains("divert_registered_namespaces 0"), "{t}");
    }
}
