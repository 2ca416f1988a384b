//! The benchmark's machinery, run small: every backend diverts (or, for the
//! floor, does not) every connection, conntrack counts are exact, the eBPF
//! profile and the registration figures come back, and the report and chart
//! are written. Nothing here looks at how fast anything was.

use divert_tests::{
    bench::{self, report, Backend, Run, Settings},
    require_root,
};

#[test]
fn the_benchmark_measures_every_backend_and_reports() {
    require_root!();
    let settings = Settings::smoke();
    let rows = bench::measure(&settings, None).expect("measure");
    assert_eq!(rows.len(), 3 * settings.ranges.len());
    for r in &rows {
        // Each connection of each batch was checked by the client: the
        // diverting backends' reached the proxy with the original
        // destination, the floor's without one.
        assert_eq!(r.samples, settings.rounds * settings.batch, "{r:?}");
        assert!(r.p50_ns > 0 && r.p50_ns <= r.p99_ns, "{r:?}");
        // One conntrack entry per connection under NAT, none without it.
        let expect = match r.backend {
            Backend::Iptables => 10_000,
            Backend::Floor | Backend::Ebpf => 0,
        };
        assert_eq!(r.conntrack_entries_per_10k, expect, "{r:?}");
        assert!(r.bulk_mb_per_sec > 0.0, "{r:?}");
        if r.backend == Backend::Ebpf {
            let runs = |name: &str| {
                r.programs
                    .iter()
                    .find(|p| p.name == name)
                    .map(|p| p.runs_per_connection)
            };
            assert_eq!(runs("divert_connect4"), Some(1.0), "{r:?}");
            assert_eq!(runs("divert_getsockopt"), Some(1.0), "{r:?}");
            assert!(runs("divert_sock_ops").is_some_and(|n| n >= 1.0), "{r:?}");
        } else {
            assert!(r.programs.is_empty());
        }
    }
    let max_pods = settings.max_pods[0];
    let mut registry = bench::registry::measure_in_child(max_pods).expect("registry");
    // A node full: the maps sized for it hold every namespace.
    assert_eq!(registry.namespaces, max_pods as usize);
    // The include and exclude tries hold each namespace's prefixes.
    let trie = |name: &str| registry.maps.iter().find(|m| m.name == name).unwrap();
    assert!(trie("INCLUDE_V4").registered_bytes > trie("INCLUDE_V4").loaded_bytes);
    assert!(trie("EXCLUDE_V4").registered_bytes > trie("EXCLUDE_V4").loaded_bytes);
    // The daemon's own memory, charged to its cgroup: at least its maps.
    let daemon = bench::registry::daemon_memory(max_pods).expect("the daemon's memory");
    assert!(daemon.maps_bytes > 0 && daemon.rss_kib > 0, "{daemon:?}");
    assert!(daemon.cgroup_bytes >= daemon.maps_bytes, "{daemon:?}");
    registry.daemon = Some(daemon);
    // Inbound and DNS capture: every connection and lookup was checked by
    // its client (captured ones reached the proxy with the destination
    // dialled, answers came from the server asked).
    let pod = bench::pod::measure(&settings).expect("the whole pod");
    assert_eq!(pod.len(), 3);
    for r in &pod {
        assert_eq!(r.samples, settings.rounds * settings.batch, "{r:?}");
        assert!(r.inbound_p50_ns > 0 && r.dns_p50_ns > 0, "{r:?}");
        match r.backend {
            // REDIRECT leaves an entry per inbound connection, and DNS
            // capture one per lookup (source ports may repeat).
            Backend::Iptables => {
                assert_eq!(r.inbound_conntrack_per_10k, 10_000, "{r:?}");
                assert!(r.dns_conntrack_per_10k > 0, "{r:?}");
            }
            Backend::Floor | Backend::Ebpf => {
                assert_eq!(
                    (r.inbound_conntrack_per_10k, r.dns_conntrack_per_10k),
                    (0, 0),
                    "{r:?}"
                );
            }
        }
    }
    let run = Run {
        machine: bench::machine().expect("machine"),
        settings,
        rows,
        registry: vec![registry],
        pod,
    };
    let text = report::text(&run);
    assert!(text.contains("ebpf/floor p50"), "{text}");
    assert!(text.contains("the whole pod"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("chart.png");
    report::chart(&run, &png).expect("chart");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}
