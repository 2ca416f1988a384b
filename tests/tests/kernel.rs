//! The kernel programs against real sockets: a fixed matrix of Istio cases, a
//! differential run against `policy::verdict()`, and getsockopt transparency.
//! Root only; each test has its own namespaces and cgroups (see `Lab`).

use std::net::SocketAddr;

use divert::policy::verdict;
use divert_tests::{
    cases::{expected, istio_matrix, seed_and_count, Generator},
    command_in, require_root,
    rig::EbpfRig,
};
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn istio_case_matrix() {
    require_root!();
    let mut rig = EbpfRig::start();
    let mut failures = Vec::new();
    for c in istio_matrix(&rig.lab) {
        let p = rig.set(c.policy);
        // The hand-written expectation and the reference agree...
        assert_eq!(
            verdict(&p, c.dst, c.uid, c.gid).action,
            c.want,
            "{}: verdict() disagrees with the table",
            c.name
        );
        // ...and so does the kernel.
        let got = rig.dial(c.dst, c.uid, c.gid, c.mapped);
        let want_line = expected(c.want, c.dst, c.mapped);
        if got != want_line {
            failures.push(format!(
                "{}: dial {} as {}/{} mapped={}\n   got  {got}\n   want {want_line}",
                c.name, c.dst, c.uid, c.gid, c.mapped
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn kernel_agrees_with_verdict_on_random_cases() {
    require_root!();
    let mut rig = EbpfRig::start();
    let (seed, cases) = seed_and_count(400);
    eprintln!("differential: {cases} cases, seed {seed} (DIVERT_TEST_SEED, DIVERT_TEST_CASES)");
    let mut rng = StdRng::seed_from_u64(seed);
    let gen = Generator::new(&rig.lab);
    let mut mismatches = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..cases {
        let policy = gen.policy(&mut rng);
        let p = rig.set(policy);
        // A few dials per policy keep the run short.
        for _ in 0..3 {
            let (dst, uid, gid, mapped) = gen.dial(&mut rng);
            let v = verdict(&p, dst, uid, gid);
            *seen
                .entry(
                    format!("{:?}", v.rule)
                        .split('(')
                        .next()
                        .unwrap()
                        .to_string(),
                )
                .or_default() += 1;
            let want = expected(v.action, dst, mapped);
            let got = rig.dial(dst, uid, gid, mapped);
            if got != want {
                mismatches.push(format!(
                    "case {i}: {dst} as {uid}/{gid} mapped={mapped} rule={:?}\n  policy {p:?}\n  got  {got}\n  want {want}",
                    v.rule
                ));
            }
        }
    }
    eprintln!("differential: rules exercised {seen:?}");
    assert!(
        seen.len() >= 9,
        "the random cases exercise too few rules: {seen:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatch(es):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn getsockopt_program_leaves_other_options_alone() {
    require_root!();
    let rig = EbpfRig::start();
    let dst = SocketAddr::new(rig.lab.v4(2), 80).to_string();
    let report = |cg| {
        let (mut cmd, _keep) =
            command_in(rig.lab.in_client(cg, None), divert_tests::testkit_bin()).unwrap();
        let out = cmd.args(["sockopts", &dst]).output().unwrap();
        assert!(
            out.status.success(),
            "sockopts failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The proxy cgroup has divert's getsockopt program; "plain" has none.
    let shown = |cg: &std::path::Path| {
        let out = std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(cg)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        shown(&rig.lab.proxy.path).contains("divert_getsock"),
        "getsockopt program not attached"
    );
    assert!(!shown(&rig.lab.plain.path).contains("divert_getsock"));
    let with = report(&rig.lab.proxy);
    let without = report(&rig.lab.plain);
    assert!(with.lines().count() >= 12, "short report: {with}");
    let differing: Vec<String> = with
        .lines()
        .zip(without.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  with    {a}\n  without {b}"))
        .collect();
    assert!(
        differing.is_empty(),
        "getsockopt results differ under divert's program:\n{}",
        differing.join("\n")
    );
    assert_eq!(with.lines().count(), without.lines().count());
}
