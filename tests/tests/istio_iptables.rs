//! `divert istio-iptables`: the command line Istio's injector writes, run
//! unchanged. Every istio-init and istio-validation container of Istio's own
//! injector goldens (kept as `tests/testdata/istio-injector/commands.json`),
//! its args and env exactly, is either applied or refused with a message
//! naming what divert does not do; never a usage error. Exit statuses,
//! istio's defaults and booleans; `--run-validation` as istio-validation
//! runs it (root, in a lab).

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use divert_tests::{command_in, divert_bin, require_root, Lab, INJECTOR};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `divert istio-iptables ARGS…` with only `env` in the environment.
fn istio_iptables(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(divert_bin())
        .arg("istio-iptables")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("running divert istio-iptables")
}

fn dry(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = INJECTOR.iter().map(|s| s.to_string()).collect();
    v.extend(["--backend", "iptables", "--dry-run"].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn the_injectors_command_line_runs_under_both_entry_points() {
    let args = dry(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let as_sub = istio_iptables(&args, &[]);
    assert!(as_sub.status.success(), "{}", text(&as_sub.stderr));
    assert!(text(&as_sub.stdout).contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
    // The same as `divert init`.
    let init = Command::new(divert_bin())
        .arg("init")
        .args(&args)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(text(&init.stdout), text(&as_sub.stdout));
    // A binary named istio-iptables (an image's symlink) is the subcommand.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("istio-iptables");
    std::os::unix::fs::symlink(divert_bin(), &link).unwrap();
    let as_name = Command::new(&link)
        .args(&args)
        .env_clear()
        .output()
        .unwrap();
    assert!(as_name.status.success(), "{}", text(&as_name.stderr));
    assert_eq!(text(&as_name.stdout), text(&as_sub.stdout));
}

#[test]
fn errors_exit_as_istio_iptables_does() {
    // A bad value: 1 under istio-iptables, 2 under divert init.
    let bad = dry(&["-p", "http"]);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let out = istio_iptables(&bad, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--envoy-port (-p)"));
    let out = Command::new(divert_bin())
        .arg("init")
        .args(&bad)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Extra flags, environment, and what the refusal must name.
type Refusal<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn what_divert_does_not_do_is_refused_by_name() {
    let cases: Vec<Refusal> = vec![
        (vec![], vec![("INVALID_DROP", "maybe")], "INVALID_DROP"),
        (
            vec![],
            vec![("ISTIO_META_DNS_CAPTURE", "yes")],
            "ISTIO_META_DNS_CAPTURE",
        ),
        (
            vec![
                "--redirect-dns",
                "--resolv-conf",
                "/nonexistent/resolv.conf",
            ],
            vec![],
            "/nonexistent/resolv.conf",
        ),
        (
            vec!["-m", "TPROXY", "-r", "255"],
            vec![],
            "--inbound-tproxy-route-table (-r)",
        ),
        (
            vec![],
            vec![("ISTIO_OUTBOUND_OWNER_GROUPS", "java,a b")],
            "ISTIO_OUTBOUND_OWNER_GROUPS",
        ),
        (
            vec![],
            vec![("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/8")],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        ),
        (
            vec!["--network-namespace", "/var/run/netns/x"],
            vec![],
            "--network-namespace",
        ),
    ];
    for (extra, env, names) in cases {
        let args = dry(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = istio_iptables(&args, &env);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{extra:?} {env:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(names),
            "{extra:?} {env:?} must name {names}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{extra:?}: nothing is printed");
    }
    // Their defaults and false values are fine.
    let fine = dry(&["--drop-invalid=false", "--native-nftables=False"]);
    let fine: Vec<&str> = fine.iter().map(String::as_str).collect();
    let out = istio_iptables(
        &fine,
        &[
            ("INVALID_DROP", "0"),
            ("ISTIO_META_DNS_CAPTURE", "false"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "*"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn iptables_only_settings_are_written_as_istio_writes_them_and_refused_by_ebpf() {
    let mut args = dry(&[]);
    // DNS capture reads the nameservers from a resolv.conf of the test's own.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, "nameserver 10.96.0.10\n").unwrap();
    args.extend([
        "--resolv-conf".to_string(),
        conf.to_string_lossy().into_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let only = istio_iptables(&args, &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")]);
    assert!(only.status.success(), "{}", text(&only.stderr));
    assert!(text(&only.stdout).contains(
        "-A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN"
    ));
    let except = istio_iptables(&args, &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")]);
    assert!(except.status.success(), "{}", text(&except.stderr));
    assert!(text(&except.stdout).contains("-A ISTIO_OUTPUT -m owner --gid-owner ftp -j RETURN"));
    // istio's limit on an include list.
    let many: Vec<String> = (1..=65).map(|g| g.to_string()).collect();
    let out = istio_iptables(&args, &[("ISTIO_OUTBOUND_OWNER_GROUPS", &many.join(","))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot exceed 64"),
        "{}",
        text(&out.stderr)
    );
    // --drop-invalid (or INVALID_DROP): the mangle table's ISTIO_DROP.
    let drop = istio_iptables(&args, &[("INVALID_DROP", "1")]);
    assert!(drop.status.success(), "{}", text(&drop.stderr));
    assert!(
        text(&drop.stdout).contains("-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP")
    );
    // DNS capture and TPROXY: istio's rules (compared whole with istio's
    // goldens in tests/iptables.rs).
    let dns = istio_iptables(&args, &[("ISTIO_META_DNS_CAPTURE", "True")]);
    assert!(dns.status.success(), "{}", text(&dns.stderr));
    assert!(
        text(&dns.stdout).contains(
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053"
        ),
        "{}",
        text(&dns.stdout)
    );
    let tproxy = dry(&["-m", "TPROXY"]);
    let tproxy: Vec<&str> = tproxy.iter().map(String::as_str).collect();
    let tproxy = istio_iptables(&tproxy, &[]);
    assert!(tproxy.status.success(), "{}", text(&tproxy.stderr));
    assert!(
        text(&tproxy.stdout).contains("-j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006")
            && text(&tproxy.stdout).contains("# ip -4 rule add fwmark 1337 lookup 133"),
        "{}",
        text(&tproxy.stdout)
    );
    // --native-nftables: istio-nftables' script (compared whole with its
    // goldens in tests/iptables.rs).
    let nft = dry(&["--native-nftables"]);
    let nft: Vec<&str> = nft.iter().map(String::as_str).collect();
    let nft = istio_iptables(&nft, &[]);
    assert!(nft.status.success(), "{}", text(&nft.stderr));
    assert!(
        text(&nft.stdout)
            .contains("add rule inet istio-proxy-nat istio-output counter jump istio-redirect"),
        "{}",
        text(&nft.stdout)
    );
    // The ebpf backend cannot apply any of them: refused by name, not
    // ignored.
    let cases: Vec<Refusal> = vec![
        (vec!["--drop-invalid"], vec![], "--drop-invalid"),
        (vec!["-m", "TPROXY", "-b", "*"], vec![], "-m TPROXY"),
        (vec!["--native-nftables"], vec![], "--native-nftables"),
        (
            vec![],
            vec![("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        ),
    ];
    for (extra, env, names) in cases {
        let mut a = vec!["--backend", "ebpf", "--dry-run"];
        a.extend(extra);
        let out = istio_iptables(&a, &env);
        assert_eq!(out.status.code(), Some(1), "{a:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(names),
            "{a:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn owner_groups_reach_the_daemon_as_gids() {
    // The ebpf backend registers the filter; names are resolved here, as
    // iptables would resolve them, since the daemon cannot read the pod's
    // /etc/group.
    let out = istio_iptables(
        &["--backend", "ebpf", "--dry-run"],
        &[("ISTIO_OUTBOUND_OWNER_GROUPS", "root,2000,0")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(r#""owner_groups":{"only":["0","2000"]}"#),
        "{}",
        text(&out.stdout)
    );
    let out = istio_iptables(
        &["--backend", "ebpf", "--dry-run"],
        &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "no-such-group-here")],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no-such-group-here"),
        "{}",
        text(&out.stderr)
    );
    // Without a filter the request carries none (what daemons before it
    // understand).
    let out = istio_iptables(&["--backend", "ebpf", "--dry-run"], &[]);
    assert!(
        !text(&out.stdout).contains("owner_groups"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn dns_capture_reaches_the_daemon_with_the_nameservers() {
    // ISTIO_META_DNS_CAPTURE under the ebpf backend: the nameservers of
    // the resolv.conf, as written, in the registration request.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, "nameserver 10.96.0.10\nnameserver fd00::a\n").unwrap();
    let conf = conf.to_str().unwrap();
    let out = istio_iptables(
        &["--backend", "ebpf", "--dry-run", "--resolv-conf", conf],
        &[("ISTIO_META_DNS_CAPTURE", "true")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(
            r#""dns":{"capture_all":false,"servers_v4":["10.96.0.10"],"servers_v6":["fd00::a"]}"#
        ),
        "{}",
        text(&out.stdout)
    );
    let out = istio_iptables(
        &["--backend", "ebpf", "--dry-run", "--capture-all-dns"],
        &[("ISTIO_META_DNS_CAPTURE", "true")],
    );
    assert!(
        text(&out.stdout).contains(r#""dns":{"capture_all":true}"#),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn excluded_interfaces_are_never_left_captured_by_ebpf() {
    // -c under eBPF would still redirect connections through the interface.
    let out = istio_iptables(&["-c", "eth1", "--backend", "ebpf", "--dry-run"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("-c eth1"),
        "{}",
        text(&out.stderr)
    );
    // auto takes the backend that can apply it.
    let out = istio_iptables(&["-c", "eth1", "--dry-run", "--daemon-socket", "/"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("-A OUTPUT -o eth1 -j RETURN"));
}

#[test]
fn istio_defaults_and_value_syntax() {
    // -g follows -u; Go's booleans; Go's durations.
    let out = istio_iptables(
        &[
            "-u",
            "2000",
            "--dry-run=True",
            "--probe-timeout=1m30s",
            "--backend",
            "iptables",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("--gid-owner 2000"),
        "{}",
        text(&out.stdout)
    );
    let out = istio_iptables(&["--backend", "iptables"], &[("DRY_RUN", "1")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("* nat"));
    // An empty -m is REDIRECT.
    let out = istio_iptables(
        &["-m", "", "-b", "8080", "-n", "--backend", "iptables"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT"));
    let out = istio_iptables(&["--probe-timeout=soon", "-n"], &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("not a duration"),
        "{}",
        text(&out.stderr)
    );
}

/// One injected container: its file, its args after `istio-iptables`, and
/// its literal environment.
type Injected = (String, Vec<String>, Vec<(String, String)>);

/// Every istio-init and istio-validation container of Istio's injector
/// goldens (`tests/testdata/istio-injector/commands.json`).
fn injected_containers() -> Vec<Injected> {
    #[derive(serde::Deserialize)]
    struct Container {
        file: String,
        container: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/istio-injector/commands.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let all: Vec<Container> = serde_json::from_str(&text).expect("commands.json");
    all.into_iter()
        .map(|c| (format!("{} ({})", c.file, c.container), c.args, c.env))
        .collect()
}

#[test]
fn every_command_line_of_istios_injector_goldens_is_applied_or_refused_by_name() {
    let containers = injected_containers();
    assert!(
        containers.len() >= 100,
        "only {} istio-init/istio-validation containers found",
        containers.len()
    );
    let (mut applied, mut refused) = (0, Vec::new());
    for (file, args, env) in &containers {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["--backend", "iptables", "--dry-run"]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = istio_iptables(&a, &env);
        match out.status.code() {
            Some(0) => applied += 1,
            Some(1) => {
                let why = text(&out.stderr);
                assert!(
                    why.contains("does not") || why.contains("not supported"),
                    "{file}: {args:?}: refused without naming what is not done: {why}"
                );
                refused.push(format!("{file}: {}", why.trim()));
            }
            other => panic!(
                "{file}: {args:?} {env:?}: exit {other:?} (a usage error?): {}",
                text(&out.stderr)
            ),
        }
    }
    eprintln!(
        "injector goldens: {} command lines, {applied} applied, {} refused:\n{}",
        containers.len(),
        refused.len(),
        refused.join("\n")
    );
    assert!(
        refused.is_empty(),
        "every command line of the injector applies under the iptables backend"
    );
}

#[test]
fn run_validation_passes_on_redirecting_rules_and_fails_with_126_without() {
    require_root!();
    let lab = Lab::new().unwrap();
    let run_as = |uid: Option<(u32, u32)>, args: &[&str]| {
        let (mut cmd, _keep) = command_in(lab.in_client(&lab.plain, uid), divert_bin()).unwrap();
        cmd.arg("istio-iptables")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let validate = [
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=2s",
    ];
    // No rules yet: nothing redirects the probe.
    let t = std::time::Instant::now();
    let out = run_as(Some((1337, 1337)), &validate);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    assert!(t.elapsed() >= Duration::from_secs(2));
    // istio-iptables' rules (as istio-init writes them), then the check as
    // istio-validation runs it: as the proxy's UID.
    let mut apply: Vec<&str> = INJECTOR.to_vec();
    apply.extend(["--backend", "iptables"]);
    let out = run_as(None, &apply);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run_as(Some((1337, 1337)), &validate);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
