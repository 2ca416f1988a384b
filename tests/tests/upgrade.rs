//! Upgrades in place: `divert daemon` of this build takes over the pins of
//! another build, and that build takes this one's back (a downgrade),
//! while a workload keeps connecting.
//!
//! "The other build" is this code built with the `upgrade-test` feature
//! (`cargo xtask test` builds it and names it in `DIVERT_UPGRADE_TEST_BIN`):
//! its `PolicyHeader` and `CounterValue` have the same fields in another
//! order, so every kernel program differs from this build's and the
//! `POLICIES` and `COUNTERS` maps have other layouts of the same sizes,
//! which only the layout record tells apart: the policies are carried over
//! before the switch, the counters added in after it. The other maps are
//! shared as they are.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use divert::ebpf::pinned::{self, sys};
use divert_tests::{
    command_in, divert_bin,
    node::{text, Setup},
    require_root, testkit_bin, Daemon, INJECTOR,
};

/// The `upgrade-test` build of divert.
fn other_build() -> PathBuf {
    let bin = std::env::var_os("DIVERT_UPGRADE_TEST_BIN").expect(
        "DIVERT_UPGRADE_TEST_BIN names the divert binary built with --features upgrade-test: run `cargo xtask test`",
    );
    PathBuf::from(bin)
}

/// `divert maps` and `divert stats` of `bin` (each build reads its own
/// layout only), as JSON.
fn inspect(bin: &std::path::Path, s: &Setup, what: &str) -> serde_json::Value {
    let out = std::process::Command::new(bin)
        .args([what, "-o", "json", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The pinned cgroup links: (program name, link id, program id).
fn links(s: &Setup) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(s.bpffs.path().join("links")).unwrap() {
        let e = e.unwrap();
        let l = sys::obj_get(&e.path()).unwrap();
        let info = sys::link_info(std::os::fd::AsFd::as_fd(&l)).unwrap();
        out.push((
            e.file_name().to_string_lossy().into_owned(),
            info.id,
            info.prog_id,
        ));
    }
    out.sort();
    out
}

/// How many layout records `LAYOUTS` holds.
fn layout_records(s: &Setup) -> usize {
    let m = sys::obj_get(&s.bpffs.path().join("maps/LAYOUTS")).unwrap();
    let mut key = None;
    let mut n = 0;
    while let Some(k) =
        sys::map_get_next_key(std::os::fd::AsFd::as_fd(&m), key.as_deref(), 4).unwrap()
    {
        key = Some(k);
        n += 1;
    }
    n
}

/// Stops the load and the sampler when dropped, a failed assertion
/// included (the scope would otherwise wait for the sampler for ever).
struct StopLoad<'a> {
    sampling: &'a AtomicBool,
    stop_file: &'a std::path::Path,
}

impl Drop for StopLoad<'_> {
    fn drop(&mut self) {
        self.sampling.store(false, Ordering::Relaxed);
        let _ = std::fs::write(self.stop_file, b"");
    }
}

/// SIGTERM, as the kubelet stops a pod, and wait for the exit.
fn stop(mut d: Daemon) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(d.child.wait().unwrap().success());
}

fn connections(stats: &serde_json::Value) -> u64 {
    stats
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["connections"].as_u64().unwrap())
        .sum()
}

#[test]
fn another_build_is_taken_over_and_back_under_load_with_no_gap() {
    require_root!();
    let other = other_build();
    let s = Setup::start();
    let root = s.lab.root.path.clone();
    // The injector's -b '*': inbound capture through the namespace's socket
    // lookup link, which is switched too.
    let own = SocketAddr::new(s.lab.v4(1), 8080);
    let captured = format!("proxy {own} orig={own} peer={own}");

    // The other build installs, and the pod registers with it.
    let daemon = s.daemon_of(&other, &[]);
    let out = s.init(INJECTOR);
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    s.assert_redirected("with the other build");
    let policies = inspect(&other, &s, "maps");
    assert_eq!(policies.as_array().unwrap().len(), 1, "{policies}");
    // This build does not read the other's maps as its own.
    let out = std::process::Command::new(divert_bin())
        .args(["maps", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("map POLICIES")
            && text(&out.stderr).contains("another divert build"),
        "{}",
        text(&out.stderr)
    );

    // The load: four connections at a time, one after another, from the
    // pod's workload to the peer, each of which must reach the proxy with
    // its original destination; and a sampler of the attachments at the
    // cgroup root.
    let dst = SocketAddr::new(s.lab.v4(2), 80);
    let stop_file = s.bpffs.dir.path().join("stop-load");
    let (mut cmd, _keep) =
        command_in(s.lab.in_client(&s.lab.workload, None), testkit_bin()).unwrap();
    cmd.arg("load")
        .arg(dst.to_string())
        .arg(&stop_file)
        .stdout(std::process::Stdio::piped());
    let load = cmd.spawn().unwrap();
    let sampling = AtomicBool::new(true);
    let (samples, wrong) = thread::scope(|scope| {
        let stop_load = StopLoad {
            sampling: &sampling,
            stop_file: &stop_file,
        };
        let sampler = scope.spawn(|| {
            let (mut n, mut wrong) = (0u64, Vec::new());
            while sampling.load(Ordering::Relaxed) {
                let counts = pinned::attachment_counts(&root).unwrap();
                if !counts.iter().all(|&(_, got, ours)| got == ours) {
                    wrong.push(counts);
                }
                n += 1;
            }
            (n, wrong)
        });
        thread::sleep(Duration::from_millis(300));

        // Upgrade: the other build's daemon stops, this build's starts and
        // takes over.
        let before = links(&s);
        let stats_before = inspect(&other, &s, "stats");
        stop(daemon);
        // What a takeover killed half-way leaves: a staging directory
        // holding a pin of the wrong map under a map's name (which the
        // loader would take as that map), and a layout record of a map that
        // is gone. Both go before the new programs are loaded.
        let stage = s.bpffs.path().join("upgrade");
        std::fs::create_dir(&stage).unwrap();
        let pods = sys::obj_get(&s.bpffs.path().join("maps/PODS")).unwrap();
        sys::obj_pin(std::os::fd::AsFd::as_fd(&pods), &stage.join("POLICIES")).unwrap();
        let layouts = sys::obj_get(&s.bpffs.path().join("maps/LAYOUTS")).unwrap();
        let record = vec![0u8; std::mem::size_of::<divert_common::layout::MapLayout>()];
        sys::map_update(
            std::os::fd::AsFd::as_fd(&layouts),
            &u32::MAX.to_ne_bytes(),
            &record,
            sys::BPF_ANY,
        )
        .unwrap();
        let daemon = s.daemon();
        assert!(!stage.exists(), "the staging directory is removed");
        let log = s.daemon_log();
        assert!(log.contains("took over the pinned instance"), "{log}");
        assert!(
            log.contains(r#"("POLICIES", 1), ("COUNTERS", "#),
            "the policy and the counters carried over: {log}"
        );
        eprintln!(
            "upgrade: {}",
            log.lines().find(|l| l.contains("took over")).unwrap()
        );
        thread::sleep(Duration::from_millis(300));
        let after = links(&s);
        // The same links (ids), each running a new program.
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!((&b.0, b.1), (&a.0, a.1), "the link itself stays");
            assert_ne!(b.2, a.2, "{}: runs this build's program", a.0);
        }
        assert_eq!(inspect(&divert_bin(), &s, "maps"), policies);
        // One record per map pinned: those of the maps that went are gone.
        assert_eq!(layout_records(&s), divert_common::MAPS.len());
        assert_eq!(s.lab.dial_in(own).unwrap(), captured, "after the upgrade");
        assert!(connections(&inspect(&divert_bin(), &s, "stats")) >= connections(&stats_before));

        // Downgrade: and back.
        let stats_before = inspect(&divert_bin(), &s, "stats");
        stop(daemon);
        let daemon = s.daemon_of(&other, &[]);
        let log = s.daemon_log();
        assert!(log.contains("took over the pinned instance"), "{log}");
        eprintln!(
            "downgrade: {}",
            log.lines().find(|l| l.contains("took over")).unwrap()
        );
        thread::sleep(Duration::from_millis(300));
        let back = links(&s);
        for (a, b) in after.iter().zip(&back) {
            assert_eq!((&a.0, a.1), (&b.0, b.1), "the link itself stays");
        }
        assert_eq!(inspect(&other, &s, "maps"), policies);
        assert_eq!(layout_records(&s), divert_common::MAPS.len());
        assert!(connections(&inspect(&other, &s, "stats")) >= connections(&stats_before));
        s.assert_redirected("after the downgrade");
        assert_eq!(s.lab.dial_in(own).unwrap(), captured, "after the downgrade");

        // And this build again, for a node of more pods: every map sized
        // by --max-pods is made anew, the capture listeners' socket hash
        // too, whose sockets are found again in the pod.
        let stats_before = inspect(&other, &s, "stats");
        stop(daemon);
        let daemon = s.daemon_with(&["--max-pods", "200"]);
        let log = s.daemon_log();
        assert!(
            log.contains(r#"("LISTENERS", 2)"#),
            "the listeners (IPv4, IPv6) found again: {log}"
        );
        eprintln!(
            "more pods: {}",
            log.lines().find(|l| l.contains("took over")).unwrap()
        );
        thread::sleep(Duration::from_millis(300));
        assert_eq!(inspect(&divert_bin(), &s, "maps"), policies);
        assert_eq!(s.lab.dial_in(own).unwrap(), captured, "with more pods");
        assert!(connections(&inspect(&divert_bin(), &s, "stats")) >= connections(&stats_before));
        drop(daemon);

        drop(stop_load);
        sampler.join().unwrap()
    });
    let out = load.wait_with_output().unwrap();
    let report = text(&out.stdout);
    eprintln!("{report}; {samples} samples of the attachments");
    let counts: Vec<u64> = report
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [ok, escaped, failed] = counts[..] else {
        panic!("{report}")
    };
    // Every connect was counted once, by the old programs or the new: the
    // counters were added into the new map after each switch. (An
    // increment that lands on a series between the daemon reading it and
    // writing the sum back is lost: a window of microseconds, so at most
    // one per switch here.)
    let counted = connections(&inspect(&divert_bin(), &s, "stats"));
    // The load's, two dials out and three captured in.
    let made = ok + escaped + failed + 5;
    eprintln!("counted {counted} of {made} connections");
    assert!(
        counted <= made && made - counted <= 2,
        "counted {counted} of {made}"
    );
    assert!(ok > 100, "{report}");
    assert_eq!((escaped, failed), (0, 0), "{report}");
    assert!(
        samples > 100 && wrong.is_empty(),
        "{samples} samples: {wrong:?}"
    );
}
