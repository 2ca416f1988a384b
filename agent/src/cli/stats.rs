//! `divert stats [--top N] [--pod NS/NAME | --netns COOKIE] [--verdict V]
//! [--watch]`: connections and payload bytes per destination and verdict,
//! redirected and passed-through alike, from the kernel's `COUNTERS`.
//!
//! Connections are counted at `connect()`; bytes when a connection closes,
//! so a connection still open shows in `connections` and not yet in the
//! bytes. `COUNTERS` is an LRU of
//! [`MapSizes::counters`](divert_common::MapSizes::counters) series: past that, the least recently updated series is evicted and
//! starts again from zero the next time it is counted.

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::inspect::{self, Output, ReadArgs, Target};
use crate::ebpf::{Counter, PodRef};

/// Arguments of `divert stats`.
#[derive(Args, Debug, Clone)]
pub struct StatsArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub target: Target,

    /// Only the N rows with the most connections (0: all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub top: usize,

    /// Only connections with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictFilter>,

    /// Print again every --interval, with per-second rates over it, until
    /// interrupted.
    #[arg(long)]
    pub watch: bool,

    /// Seconds between --watch samples.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 2.0,
        requires = "watch"
    )]
    pub interval: f64,
}

/// `--verdict`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictFilter {
    /// Rewritten to the outbound proxy port.
    Redirected,
    /// Left alone: the connection went where the application asked.
    Passthrough,
    /// Sent to the inbound capture port: a proxy connect to the pod's own
    /// address, or an inbound connection captured by socket lookup.
    #[value(name = "inbound_capture", alias = "inbound-capture")]
    InboundCapture,
    /// DNS sent to the DNS proxy (TCP connections, and UDP connects and
    /// datagrams sent with a destination).
    Dns,
}

impl VerdictFilter {
    fn name(self) -> &'static str {
        use divert_common::Verdict;
        match self {
            VerdictFilter::Redirected => Verdict::Redirect,
            VerdictFilter::Passthrough => Verdict::PassThrough,
            VerdictFilter::InboundCapture => Verdict::InboundCapture,
            VerdictFilter::Dns => Verdict::Dns,
        }
        .name()
    }
}

/// Per-second growth over one `--watch` interval.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub connections_per_sec: f64,
    pub bytes_sent_per_sec: f64,
    pub bytes_received_per_sec: f64,
}

/// One destination of one namespace, as `divert stats -o json` prints it:
/// the [`Counter`]'s fields (`netns_cookie`, `destination`, `port`,
/// `verdict`, `connections`, `bytes_sent`, `bytes_received`), `pod`, and
/// with `--watch` the [`Rates`].
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StatsRow {
    #[serde(flatten)]
    pub counter: Counter,
    /// The pod, when the daemon's pod watch recorded it; else null.
    pub pod: Option<PodRef>,
    /// With `--watch` only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

/// Run `divert stats`: 0, or 2 with the error on stderr. With `--watch` it
/// runs until interrupted or an error.
pub fn main(args: &StatsArgs) -> ExitCode {
    match run(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("stats", &e),
    }
}

fn run(args: &StatsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let dir = &args.read.bpffs_dir;
    let mut maps = inspect::open(dir)?;
    let only = inspect::cookie_of(&mut maps, &args.target, dir)?;
    let sample = || -> anyhow::Result<Vec<StatsRow>> {
        let pods = maps.pods()?;
        Ok(rows(&maps.counters()?, &pods, only, args.verdict))
    };
    if !args.watch {
        let rows = top(sample()?, args.top);
        return match args.read.output {
            Output::Json => inspect::json(out, &rows),
            Output::Table => Ok(print_table(out, &rows)?),
        };
    }
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        anyhow::bail!(
            "--interval {} is not a positive number of seconds",
            args.interval
        );
    }
    let interval = Duration::from_secs_f64(args.interval);
    let clear = args.read.output == Output::Table && std::io::stdout().is_terminal();
    let (mut before, mut at) = (sample()?, Instant::now());
    loop {
        std::thread::sleep(interval);
        let now = sample()?;
        let elapsed = at.elapsed().as_secs_f64();
        at = Instant::now();
        let rated = top(with_rates(&before, now.clone(), elapsed), args.top);
        before = now;
        match args.read.output {
            Output::Json => inspect::json(out, &rated)?,
            Output::Table => {
                if clear {
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                writeln!(out, "{}", inspect::rfc3339(std::time::SystemTime::now()))?;
                print_table(out, &rated)?;
                writeln!(out)?;
            }
        }
        out.flush()?;
    }
}

/// The counters as rows, filtered to one namespace and one verdict when
/// asked, sorted by connections (most first), then namespace, destination,
/// port and verdict.
pub fn rows(
    counters: &[Counter],
    pods: &std::collections::BTreeMap<u64, PodRef>,
    only: Option<u64>,
    verdict: Option<VerdictFilter>,
) -> Vec<StatsRow> {
    let mut rows: Vec<StatsRow> = counters
        .iter()
        .filter(|c| only.is_none_or(|n| n == c.netns_cookie))
        .filter(|c| verdict.is_none_or(|v| v.name() == c.verdict))
        .map(|c| StatsRow {
            counter: c.clone(),
            pod: pods.get(&c.netns_cookie).cloned(),
            rates: None,
        })
        .collect();
    rows.sort_by(|a, b| {
        let (a, b) = (&a.counter, &b.counter);
        b.connections
            .cmp(&a.connections)
            .then(a.netns_cookie.cmp(&b.netns_cookie))
            .then(a.destination.cmp(&b.destination))
            .then(a.port.cmp(&b.port))
            .then(a.verdict.cmp(b.verdict))
    });
    rows
}

fn top(mut rows: Vec<StatsRow>, n: usize) -> Vec<StatsRow> {
    if n > 0 {
        rows.truncate(n);
    }
    rows
}

/// `now` with each row's growth since `before` per second of `elapsed`. A
/// row that is new, or whose counts fell (the LRU evicted and restarted
/// it), grew by its whole value.
fn with_rates(before: &[StatsRow], now: Vec<StatsRow>, elapsed: f64) -> Vec<StatsRow> {
    let key = |r: &StatsRow| {
        let c = &r.counter;
        (c.netns_cookie, c.destination, c.port, c.verdict)
    };
    let old: HashMap<_, &StatsRow> = before.iter().map(|r| (key(r), r)).collect();
    now.into_iter()
        .map(|mut r| {
            let was = old.get(&key(&r)).map(|w| &w.counter);
            let grew = |now: u64, then: Option<u64>| match then {
                Some(t) if t <= now => (now - t) as f64,
                _ => now as f64,
            };
            let c = &r.counter;
            let fell = was.is_some_and(|w| {
                w.connections > c.connections
                    || w.bytes_sent > c.bytes_sent
                    || w.bytes_received > c.bytes_received
            });
            let was = if fell { None } else { was };
            r.rates = Some(Rates {
                connections_per_sec: grew(c.connections, was.map(|w| w.connections)) / elapsed,
                bytes_sent_per_sec: grew(c.bytes_sent, was.map(|w| w.bytes_sent)) / elapsed,
                bytes_received_per_sec: grew(c.bytes_received, was.map(|w| w.bytes_received))
                    / elapsed,
            });
            r
        })
        .collect()
}

/// The rows as a table (with rate columns when they have rates).
pub fn print_table(out: &mut impl Write, rows: &[StatsRow]) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "no outbound TCP connects counted");
    }
    let rated = rows.iter().any(|r| r.rates.is_some());
    let mut headers = vec![
        "NETNS",
        "POD",
        "DESTINATION",
        "PORT",
        "VERDICT",
        "CONNECTIONS",
        "SENT",
        "RECEIVED",
    ];
    if rated {
        headers.extend(["CONN/S", "SENT B/S", "RECV B/S"]);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let k = &r.counter;
            let mut c = vec![
                k.netns_cookie.to_string(),
                r.pod.as_ref().map_or("-".to_string(), ToString::to_string),
                k.destination.to_string(),
                k.port.to_string(),
                k.verdict.to_string(),
                k.connections.to_string(),
                k.bytes_sent.to_string(),
                k.bytes_received.to_string(),
            ];
            if let Some(x) = r.rates {
                c.extend([
                    format!("{:.1}", x.connections_per_sec),
                    format!("{:.0}", x.bytes_sent_per_sec),
                    format!("{:.0}", x.bytes_received_per_sec),
                ]);
            }
            c
        })
        .collect();
    inspect::table(out, &headers, &cells, &[0, 3, 5, 6, 7, 8, 9, 10])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(netns: u64, dst: &str, verdict: &'static str, n: u64, sent: u64) -> Counter {
        Counter {
            netns_cookie: netns,
            destination: dst.parse().unwrap(),
            port: 80,
            verdict,
            connections: n,
            bytes_sent: sent,
            bytes_received: 2 * sent,
        }
    }

    #[test]
    fn rows_filter_sort_and_take_the_top() {
        let counters = [
            c(1, "10.0.0.1", "redirected", 2, 10),
            c(1, "10.0.0.2", "passthrough", 9, 10),
            c(2, "10.0.0.3", "redirected", 5, 10),
        ];
        let pods = std::collections::BTreeMap::new();
        let all = rows(&counters, &pods, None, None);
        let order: Vec<u64> = all.iter().map(|r| r.counter.connections).collect();
        assert_eq!(order, [9, 5, 2]);
        assert_eq!(top(all, 2).len(), 2);
        let one = rows(&counters, &pods, Some(1), Some(VerdictFilter::Redirected));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].counter.destination.to_string(), "10.0.0.1");
    }

    #[test]
    fn rates_are_growth_per_second_and_evictions_restart() {
        let pods = std::collections::BTreeMap::new();
        let before = rows(
            &[
                c(1, "10.0.0.1", "redirected", 10, 100),
                c(1, "10.0.0.2", "redirected", 50, 500),
            ],
            &pods,
            None,
            None,
        );
        let now = rows(
            &[
                c(1, "10.0.0.1", "redirected", 14, 300),
                c(1, "10.0.0.2", "redirected", 2, 20),
            ],
            &pods,
            None,
            None,
        );
        let r = with_rates(&before, now, 2.0);
        let grown = r
            .iter()
            .find(|r| r.counter.connections == 14)
            .unwrap()
            .rates
            .unwrap();
        assert_eq!(
            grown,
            Rates {
                connections_per_sec: 2.0,
                bytes_sent_per_sec: 100.0,
                bytes_received_per_sec: 200.0
            }
        );
        let evicted = r
            .iter()
            .find(|r| r.counter.connections == 2)
            .unwrap()
            .rates
            .unwrap();
        assert_eq!(evicted.connections_per_sec, 1.0);
    }
}
