//! The daemon's HTTP endpoint (`--metrics-addr`, default
//! [`DEFAULT_ADDR`]): `/metrics` in Prometheus text format
//! (prometheus-client) and `/healthz/ready`. Every series and its labels:
//! `docs/metrics.md`.
//!
//! Traffic series: `divert_connections_total`, `divert_sent_bytes_total`
//! and `divert_received_bytes_total`, labelled with the source pod
//! (`source_workload_namespace`, `source_pod`: Istio's and Hubble's names,
//! which never collide with the scrape target's own `namespace` and
//! `pod`; `"unknown"` until the daemon knows the pod, as Istio writes a
//! missing value), `destination`, `port` and `verdict`. No netns cookie:
//! a pod's series keep their labels however often its namespace is made
//! again. Namespaces whose pod is unknown share the `"unknown"` series,
//! each adding its own growth.
//!
//! Cardinality is bounded per network namespace: the first `top`
//! (`--metrics-top`) destinations (address and port) seen for a namespace
//! get their own series for as long as it is registered; every later one is
//! added to the namespace's `destination="other",port=""` series of its
//! verdict. Membership never changes, so every series only grows. When the
//! last namespace adding to a series is unregistered or collected, the
//! series goes.
//!
//! The kernel's counter map is an LRU: a series it evicts starts again from
//! zero. Each scrape adds the growth since the last one; a kernel series
//! that vanished, or came back below the last value seen, was evicted
//! (`divert_counter_series_evictions_total`): its whole new value is added,
//! so what was counted is never lost, though connections counted between
//! an eviction and the next scrape can be.
//!
//! Health series ([`Health`]): `divert_build_info`,
//! `divert_registered_namespaces`, `divert_meshed_pods_unregistered`,
//! `divert_registration_errors_total{reason}`,
//! `divert_map_full_total{map}`, `divert_gc_removed_namespaces_total`.

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

/// The value of a label the daemon does not know (Istio's).
pub const UNKNOWN: &str = "unknown";

/// Labels of `divert_connections_total` and the byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// The pod's Kubernetes namespace, or [`UNKNOWN`].
    pub source_workload_namespace: String,
    /// The pod's name, or [`UNKNOWN`].
    pub source_pod: String,
    /// The destination address as dialled, or [`OTHER`].
    pub destination: String,
    /// The destination port, empty with [`OTHER`].
    pub port: String,
    /// `redirected`, `inbound_capture`, `dns` or `passthrough`.
    pub verdict: String,
}

/// Labels of `divert_registration_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `map_full`, `invalid` (a policy or annotation refused), `refused`
    /// (a request this daemon does not serve: another protocol version,
    /// the node's own namespace) or `failed` (the kernel or the namespace
    /// failed the registration).
    pub reason: String,
}

/// Labels of `divert_map_full_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// Labels of `divert_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// What the registry and the collector count, shared with the endpoint
/// that exposes them (clones count into the same series).
#[derive(Clone, Default)]
pub struct Health {
    /// `divert_registration_errors_total{reason}`.
    pub registration_errors: Family<ReasonLabels, Counter>,
    /// `divert_map_full_total{map}`: registrations refused because that
    /// map was full.
    pub map_full: Family<MapLabels, Counter>,
    /// `divert_gc_removed_namespaces_total`: policies the collector
    /// removed because their namespace was gone.
    pub gc_removed: Counter,
}

impl Health {
    /// Count a failed registration under `reason`.
    pub fn error(&self, reason: &str) {
        self.registration_errors
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Count a registration the kernel side failed: `map_full` (and the
    /// map) when a map was full, `failed` otherwise.
    pub fn registration_failed(&self, e: &anyhow::Error) {
        let full = e
            .chain()
            .find_map(|c| match c.downcast_ref::<ebpf::Error>() {
                Some(ebpf::Error::Full(map)) => Some(*map),
                _ => None,
            });
        match full {
            Some(map) => {
                self.error("map_full");
                self.map_full
                    .get_or_create(&MapLabels { map: map.into() })
                    .inc();
            }
            None => self.error("failed"),
        }
    }
}

type Key = (u64, IpAddr, u16, &'static str);

#[derive(Default)]
struct State {
    /// The kernel values last seen per series key: connections, bytes sent,
    /// bytes received.
    last: HashMap<Key, [u64; 3]>,
    /// Per namespace, the destinations with their own series.
    exposed: HashMap<u64, BTreeSet<(IpAddr, u16)>>,
    /// Per namespace, every label set it added to (to remove them when it
    /// goes, whatever is known of the pod by then).
    series: HashMap<u64, HashSet<ConnectionLabels>>,
    /// Per label set, the namespaces adding to it: a series goes with the
    /// last of them.
    users: HashMap<ConnectionLabels, HashSet<u64>>,
}

/// The metrics of one daemon.
pub struct Metrics {
    registry: PromRegistry,
    /// `divert_connections_total`, `divert_sent_bytes_total`,
    /// `divert_received_bytes_total`.
    families: [Family<ConnectionLabels, Counter>; 3],
    registered: Gauge,
    unregistered_pods: Gauge,
    /// `divert_counter_series_evictions_total`.
    evictions: Counter,
    top: usize,
    state: Mutex<State>,
}

impl Metrics {
    /// The daemon's metrics: `top` destinations per namespace with series
    /// of their own; `health`'s counters exposed too.
    pub fn new(top: usize, health: &Health) -> Metrics {
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
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "divert_build_info",
            "This divert's version (always 1)",
            build,
        );
        registry.register(
            "divert_registration_errors",
            "Registrations that failed, by reason (map_full, invalid, refused, failed)",
            health.registration_errors.clone(),
        );
        registry.register(
            "divert_map_full",
            "Registrations refused because this eBPF map was full (raise --max-pods or --max-connections)",
            health.map_full.clone(),
        );
        registry.register(
            "divert_gc_removed_namespaces",
            "Policies removed because their network namespace was gone",
            health.gc_removed.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "divert_counter_series_evictions",
            "Kernel counter series the COUNTERS LRU evicted (found gone or restarted at a scrape)",
            evictions.clone(),
        );
        Metrics {
            registry,
            families,
            registered,
            unregistered_pods,
            evictions,
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
        let st = &mut *st;
        self.registered.set(registered.len() as i64);
        let live: BTreeSet<u64> = registered.iter().copied().collect();
        // Namespaces gone: drop their bookkeeping, and each series no live
        // namespace adds to any more.
        let gone: Vec<u64> = st
            .series
            .keys()
            .chain(st.exposed.keys())
            .copied()
            .filter(|c| !live.contains(c))
            .collect();
        for c in gone {
            for labels in st.series.remove(&c).unwrap_or_default() {
                let users = st.users.entry(labels.clone()).or_default();
                users.remove(&c);
                if users.is_empty() {
                    st.users.remove(&labels);
                    for f in &self.families {
                        f.remove(&labels);
                    }
                }
            }
            st.exposed.remove(&c);
            st.last.retain(|k, _| k.0 != c);
        }
        // Series of live namespaces the kernel no longer holds: evicted.
        let present: HashSet<Key> = counters
            .iter()
            .map(|k| (k.netns_cookie, k.destination, k.port, k.verdict))
            .collect();
        let before = st.last.len();
        st.last.retain(|k, _| present.contains(k));
        self.evictions.inc_by((before - st.last.len()) as u64);
        for k in counters.iter().filter(|k| live.contains(&k.netns_cookie)) {
            let key: Key = (k.netns_cookie, k.destination, k.port, k.verdict);
            let now = [k.connections, k.bytes_sent, k.bytes_received];
            let last = st.last.insert(key, now).unwrap_or_default();
            // A value below the last one seen: the LRU evicted the series
            // and it started again from zero.
            let evicted = now.iter().zip(&last).any(|(n, l)| n < l);
            if evicted {
                self.evictions.inc();
            }
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
                .unwrap_or_else(|| (UNKNOWN.into(), UNKNOWN.into()));
            let labels = ConnectionLabels {
                source_workload_namespace: namespace,
                source_pod: pod,
                destination,
                port,
                verdict: k.verdict.to_string(),
            };
            // get_or_create even for a zero delta, so the series exists.
            for (i, f) in self.families.iter().enumerate() {
                f.get_or_create(&labels).inc_by(delta(i));
            }
            st.users
                .entry(labels.clone())
                .or_default()
                .insert(k.netns_cookie);
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

    /// The value of an unlabelled series.
    fn plain(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
    }

    fn value(text: &str, needle: &str) -> Option<u64> {
        series(text, "divert_connections_total", needle)
    }

    #[test]
    fn destinations_beyond_the_top_fold_and_every_series_only_grows() {
        let m = Metrics::new(2, &Health::default());
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
        assert!(
            t.contains(r#"source_workload_namespace="shop",source_pod="cart-1""#),
            "{t}"
        );
        assert!(!t.contains("netns_cookie"), "{t}");
        assert!(
            t.contains(&format!(
                "divert_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{t}"
        );
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
        assert_eq!(
            plain(&t, "divert_counter_series_evictions_total"),
            Some(1),
            "{t}"
        );
        // The kernel lost a series (evicted) while its namespace lives:
        // counted; when it comes back its whole value is added.
        m.update(
            &[
                c(7, "10.0.0.1", 80, "redirected", 9),
                c(7, "10.0.0.3", 443, "passthrough", 2),
                c(7, "10.0.0.4", 443, "passthrough", 4),
            ],
            &[7],
            &id,
        );
        m.update(
            &[
                c(7, "10.0.0.1", 80, "redirected", 9),
                c(7, "10.0.0.2", 80, "redirected", 2),
                c(7, "10.0.0.3", 443, "passthrough", 2),
                c(7, "10.0.0.4", 443, "passthrough", 4),
            ],
            &[7],
            &id,
        );
        let t = m.render();
        assert_eq!(
            plain(&t, "divert_counter_series_evictions_total"),
            Some(2),
            "{t}"
        );
        assert_eq!(
            value(&t, r#"destination="10.0.0.2",port="80""#),
            Some(6),
            "{t}"
        );
        // Unregistered (and its identity already forgotten): its series go.
        m.update(&[], &[], &BTreeMap::new());
        let t = m.render();
        assert!(!t.contains("cart-1"), "{t}");
        assert!(t.contains("divert_registered_namespaces 0"), "{t}");
    }

    #[test]
    fn namespaces_of_unknown_pods_share_a_series_until_the_last_goes() {
        let m = Metrics::new(20, &Health::default());
        let none = BTreeMap::new();
        m.update(
            &[
                c(1, "10.0.0.1", 80, "redirected", 2),
                c(2, "10.0.0.1", 80, "redirected", 3),
            ],
            &[1, 2],
            &none,
        );
        let labels = r#"source_workload_namespace="unknown",source_pod="unknown",destination="10.0.0.1",port="80",verdict="redirected""#;
        assert_eq!(value(&m.render(), labels), Some(5));
        // One goes: the series stays for the other, and grows with it.
        m.update(&[c(2, "10.0.0.1", 80, "redirected", 4)], &[2], &none);
        assert_eq!(value(&m.render(), labels), Some(6));
        m.update(&[], &[], &none);
        assert_eq!(value(&m.render(), labels), None);
    }

    #[test]
    fn a_full_map_is_counted_by_reason_and_by_map() {
        let h = Health::default();
        let m = Metrics::new(20, &h);
        h.registration_failed(
            &anyhow::Error::new(ebpf::Error::Full("POLICIES")).context("registering"),
        );
        h.registration_failed(&anyhow::anyhow!("the namespace is gone"));
        h.error("invalid");
        h.gc_removed.inc();
        let t = m.render();
        for (needle, n) in [
            (r#"divert_registration_errors_total{reason="map_full"}"#, 1),
            (r#"divert_registration_errors_total{reason="failed"}"#, 1),
            (r#"divert_registration_errors_total{reason="invalid"}"#, 1),
            (r#"divert_map_full_total{map="POLICIES"}"#, 1),
            ("divert_gc_removed_namespaces_total", 1),
        ] {
            assert!(t.contains(&format!("{needle} {n}")), "{needle}: {t}");
        }
    }
}
