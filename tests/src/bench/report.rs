//! What a benchmark run prints and draws: the figures table, the ratios
//! against our targets, and a PNG of connect latency against range count.

use std::{fmt::Write as _, path::Path};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::{Backend, Row, Run};

/// The font the chart is drawn with (Debian's fonts-dejavu-core, which
/// `cargo xtask setup` installs).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Our targets: eBPF's p50 within this factor of the floor at every range
/// count, and iptables at the largest range count at least this many times
/// eBPF's p50 ("several times slower").
pub const EBPF_OVER_FLOOR_TARGET: f64 = 1.10;
pub const IPTABLES_OVER_EBPF_TARGET: f64 = 3.0;

fn row(rows: &[Row], backend: Backend, ranges: usize) -> Option<&Row> {
    rows.iter()
        .find(|r| r.backend == backend && r.ranges == ranges)
}

fn range_counts(rows: &[Row]) -> Vec<usize> {
    let mut v: Vec<usize> = rows.iter().map(|r| r.ranges).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// Thousands separated by commas: 10000 → "10,000".
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The whole report as text: machine, figures, ratios and targets, the
/// eBPF program profile, and the registration figures.
pub fn text(run: &Run) -> String {
    let rows = &run.rows;
    let m = &run.machine;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kernel {}, {} × {}, client on CPU {}, proxy on CPU {}, {}",
        m.kernel,
        m.cpus,
        m.cpu,
        m.client_cpu.map_or("any".into(), |c| c.to_string()),
        m.proxy_cpu.map_or("any".into(), |c| c.to_string()),
        m.iptables
    );
    let _ = writeln!(
        s,
        "connect() to the proxy's accept(); {} rounds × {} connections per cell, interleaved\n",
        run.settings.rounds, run.settings.batch
    );
    let _ = writeln!(
        s,
        "{:>7}  {:<8} {:>9} {:>9} {:>9} {:>12} {:>10} {:>10} {:>10}",
        "ranges",
        "backend",
        "p50 µs",
        "p99 µs",
        "conn/s",
        "origdst ns",
        "ct/10k",
        "bulk MB/s",
        "install ms"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>7}  {:<8} {:>9.1} {:>9.1} {:>9.0} {:>12} {:>10} {:>10.0} {:>10.2}",
            grouped(r.ranges),
            r.backend.name(),
            us(r.p50_ns),
            us(r.p99_ns),
            r.connections_per_sec,
            r.so_original_dst_p50_ns,
            r.conntrack_entries_per_10k,
            r.bulk_mb_per_sec,
            r.policy_install_ms
        );
    }
    let _ = writeln!(
        s,
        "\n{:>7}  {:>15} {:>15} {:>18} {:>18}",
        "ranges", "ebpf/floor p50", "ebpf/floor p99", "iptables/ebpf p50", "iptables/ebpf p99"
    );
    let mut worst: Option<(f64, usize)> = None;
    for n in range_counts(rows) {
        let (Some(f), Some(i), Some(e)) = (
            row(rows, Backend::Floor, n),
            row(rows, Backend::Iptables, n),
            row(rows, Backend::Ebpf, n),
        ) else {
            continue;
        };
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        let ef = ratio(e.p50_ns, f.p50_ns);
        if worst.is_none_or(|(w, _)| ef > w) {
            worst = Some((ef, n));
        }
        let _ = writeln!(
            s,
            "{:>7}  {:>14.2}× {:>14.2}× {:>17.2}× {:>17.2}×",
            grouped(n),
            ef,
            ratio(e.p99_ns, f.p99_ns),
            ratio(i.p50_ns, e.p50_ns),
            ratio(i.p99_ns, e.p99_ns)
        );
    }
    if let Some((w, n)) = worst {
        let _ = writeln!(
            s,
            "\ntarget: ebpf p50 within {EBPF_OVER_FLOOR_TARGET:.2}× of the floor at every range count: {} (largest {w:.3}× at {} ranges)",
            if w <= EBPF_OVER_FLOOR_TARGET { "met" } else { "missed" },
            grouped(n)
        );
    }
    if let Some(n) = range_counts(rows).last().copied() {
        if let (Some(i), Some(e)) = (row(rows, Backend::Iptables, n), row(rows, Backend::Ebpf, n)) {
            let r = i.p50_ns as f64 / e.p50_ns.max(1) as f64;
            let _ = writeln!(
                s,
                "target: iptables at {} ranges at least {IPTABLES_OVER_EBPF_TARGET:.0}× ebpf's p50: {} ({r:.1}×)",
                grouped(n),
                if r >= IPTABLES_OVER_EBPF_TARGET { "met" } else { "missed" }
            );
        }
    }
    let _ = writeln!(
        s,
        "\neBPF programs: ns per run × runs per connection (kernel run-time accounting, a separate {} connections):",
        run.settings.profile_connections
    );
    for r in rows.iter().filter(|r| r.backend == Backend::Ebpf) {
        let progs: Vec<String> = r
            .programs
            .iter()
            .map(|p| {
                format!(
                    "{} {} × {:.1}",
                    p.name.trim_start_matches("divert_"),
                    p.ns_per_run,
                    p.runs_per_connection
                )
            })
            .collect();
        let total: f64 = r
            .programs
            .iter()
            .map(|p| p.ns_per_run as f64 * p.runs_per_connection)
            .sum();
        let _ = writeln!(
            s,
            "{:>7}  {}  = {:.0} ns per connection",
            grouped(r.ranges),
            progs.join(", "),
            total
        );
    }
    let sampled: Vec<&Row> = rows
        .iter()
        .filter(|r| r.backend == Backend::Ebpf && !r.perf.is_empty())
        .collect();
    if !sampled.is_empty() {
        let _ = writeln!(
            s,
            "\nwhere it goes (perf record, {} samples/s per CPU, {} connections): each program's samples by the function it was calling",
            super::perf::FREQ,
            super::PERF_CONNECTIONS_PER_PROFILED * run.settings.profile_connections
        );
        for r in sampled {
            for line in super::perf::text(&r.perf) {
                let _ = writeln!(s, "{:>7}  {line}", grouped(r.ranges));
            }
        }
    }
    if !run.pod.is_empty() {
        let _ = writeln!(
            s,
            "\nthe whole pod: inbound connections from a peer to 10.213.0.1:8080 (captured to 15006) and DNS lookups to 10.213.0.2:53 (captured to 15053), {} samples each:",
            grouped(run.pod[0].samples)
        );
        let _ = writeln!(
            s,
            "{:<9} {:>12} {:>12} {:>10} {:>14} {:>14}  {:>9} {:>9} {:>14}",
            "backend",
            "inbound p50",
            "inbound p99",
            "conn/s",
            "SO_ORIG p50",
            "conntrack/10k",
            "DNS p50",
            "DNS p99",
            "conntrack/10k"
        );
        for r in &run.pod {
            let _ = writeln!(
                s,
                "{:<9} {:>10.1}µs {:>10.1}µs {:>10.0} {:>12.2}µs {:>14}  {:>7.1}µs {:>7.1}µs {:>14}",
                r.backend.name(),
                us(r.inbound_p50_ns),
                us(r.inbound_p99_ns),
                r.inbound_connections_per_sec,
                us(r.inbound_so_original_dst_p50_ns),
                r.inbound_conntrack_per_10k,
                us(r.dns_p50_ns),
                us(r.dns_p99_ns),
                r.dns_conntrack_per_10k
            );
        }
        let of = |b: Backend| run.pod.iter().find(|r| r.backend == b);
        if let (Some(f), Some(i), Some(e)) =
            (of(Backend::Floor), of(Backend::Iptables), of(Backend::Ebpf))
        {
            let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
            let _ = writeln!(
                s,
                "inbound p50: ebpf/floor {:.2}×, iptables/ebpf {:.2}×; DNS p50: ebpf/floor {:.2}×, iptables/ebpf {:.2}×",
                ratio(e.inbound_p50_ns, f.inbound_p50_ns),
                ratio(i.inbound_p50_ns, e.inbound_p50_ns),
                ratio(e.dns_p50_ns, f.dns_p50_ns),
                ratio(i.dns_p50_ns, e.dns_p50_ns),
            );
        }
    }
    for g in &run.registry {
        let _ = writeln!(
            s,
            "\na node of {} pods (--max-pods {}, --max-connections {}; flags: {}):\n  register p50 {:.1} µs, p99 {:.1} µs; unregister p50 {:.1} µs\n  \
             map memory {:.1} MiB loaded, {:.1} MiB with {} namespaces; RSS {:.1} MiB loaded, {:.1} MiB with {} namespaces",
            grouped(g.namespaces),
            g.max_pods,
            g.max_connections,
            g.policy_flags,
            g.register_p50_us,
            g.register_p99_us,
            g.unregister_p50_us,
            g.maps_loaded_bytes as f64 / (1 << 20) as f64,
            g.maps_registered_bytes as f64 / (1 << 20) as f64,
            grouped(g.namespaces),
            g.rss_loaded_kib as f64 / 1024.0,
            g.rss_registered_kib as f64 / 1024.0,
            grouped(g.namespaces),
        );
        if let Some(d) = &g.daemon {
            let _ = writeln!(
                s,
                "  divert daemon --max-pods {}: its memory cgroup {:.1} MiB without page cache ({:.1} MiB more; maps {:.1} MiB, RSS {:.1} MiB)",
                g.max_pods,
                d.cgroup_bytes.saturating_sub(d.page_cache_bytes) as f64 / (1 << 20) as f64,
                d.page_cache_bytes as f64 / (1 << 20) as f64,
                d.maps_bytes as f64 / (1 << 20) as f64,
                d.rss_kib as f64 / 1024.0,
            );
        }
        for m in &g.maps {
            let _ = writeln!(
                s,
                "    {:<16} {:>8} entries max  {:>10} B loaded  {:>10} B registered",
                m.name, m.max_entries, m.loaded_bytes, m.registered_bytes
            );
        }
    }
    s
}

/// Draw p50 (solid) and p99 (dashed) connect latency against the number of
/// exclude ranges (log scale), one colour per backend, into `path` (PNG).
pub fn chart(run: &Run, path: &Path) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading the chart font {FONT} (cargo xtask setup installs fonts-dejavu-core)")
    })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))?;
    let rows = &run.rows;
    let counts = range_counts(rows);
    let (xmin, xmax) = (
        *counts.first().context("no rows to draw")? as f64,
        *counts.last().unwrap() as f64,
    );
    let ymax = rows.iter().map(|r| us(r.p99_ns)).fold(0.0, f64::max);
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(
            format!(
                "connect() → proxy accept(), Linux {} ({} CPUs)",
                run.machine.kernel, run.machine.cpus
            ),
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin * 0.7..xmax * 1.4).log_scale(), 0.0..ymax * 1.1)?;
    c.configure_mesh()
        .x_desc("exclude ranges in the policy (log)")
        .y_desc("latency, µs")
        .x_label_formatter(&|x| grouped(x.round() as usize))
        .y_labels(10)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    for (backend, color) in [
        (Backend::Floor, RGBColor(90, 90, 90)),
        (Backend::Iptables, RGBColor(214, 39, 40)),
        (Backend::Ebpf, RGBColor(31, 119, 180)),
    ] {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.backend == backend).collect();
        let p50: Vec<(f64, f64)> = mine
            .iter()
            .map(|r| (r.ranges as f64, us(r.p50_ns)))
            .collect();
        let p99: Vec<(f64, f64)> = mine
            .iter()
            .map(|r| (r.ranges as f64, us(r.p99_ns)))
            .collect();
        c.draw_series(LineSeries::new(p50.clone(), color.stroke_width(3)))?
            .label(format!("{} p50", backend.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
        c.draw_series(p50.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        c.draw_series(DashedLineSeries::new(p99, 8, 6, color.stroke_width(1)))?
            .label(format!("{} p99", backend.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(1)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
