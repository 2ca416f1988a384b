//! Applying a [`RuleSet`] to the calling thread's network namespace.
//!
//! * **Which iptables**: [`detect`] picks the binaries as istio-iptables
//!   does (`tools/istio-iptables/pkg/dependencies`, `DetectIptablesVersion`):
//!   `FORCE_IPTABLES_BINARY=legacy|nft` if set; otherwise the legacy
//!   binaries when legacy rules already exist in this namespace; otherwise
//!   the nft binaries; otherwise plain `iptables`.
//! * **Atomic**: one `iptables-restore --noflush` transaction per address
//!   family touching only the nat table. Chains are declared with
//!   `:CHAIN - [0:0]`, which creates them or empties them, so a transaction
//!   also replaces an earlier run's rules: running twice leaves the same
//!   table as running once. If the IPv6 transaction fails after the IPv4
//!   one succeeded, the IPv4 nat table is restored from the snapshot taken
//!   before, so a namespace is either fully configured or as it was.
//! * **Exactly ours**: what belongs to divert is the four [`CHAINS`], every
//!   rule in a built-in chain that jumps to one of them, and the interface
//!   rules (`-i/-o IF -j RETURN`) the same flags render, one for one.
//!   [`cleanup`] removes those and nothing else.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{Family, Rule, RuleSet, CHAINS, ISTIO_DROP};

/// The iptables binaries chosen for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iptables {
    pub family: Family,
    /// The base command, e.g. `iptables-nft` or `ip6tables-legacy`; `-save`
    /// and `-restore` are appended for the other two.
    pub command: String,
    /// Whether this is the legacy (x_tables) variant, which takes the
    /// xtables lock (`-w`).
    pub legacy: bool,
}

impl Iptables {
    fn save_cmd(&self) -> String {
        format!("{}-save", self.command)
    }

    fn restore_cmd(&self) -> String {
        format!("{}-restore", self.command)
    }

    /// `<command>-save -t nat`: the nat table as iptables-restore input.
    pub fn save_nat(&self) -> Result<String> {
        self.save_table("nat")
    }

    /// `<command>-save -t TABLE`: one table as iptables-restore input.
    pub fn save_table(&self, table: &str) -> Result<String> {
        let out = Command::new(self.save_cmd())
            .args(["-t", table])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.save_cmd()))?;
        if !out.status.success() {
            bail!(
                "{} -t {table} failed ({}): {}",
                self.save_cmd(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Feed `input` to `<command>-restore`, with `--noflush` unless
    /// `replace` (which replaces every table the input names).
    pub fn restore(&self, input: &str, replace: bool) -> Result<()> {
        let mut cmd = Command::new(self.restore_cmd());
        if !replace {
            cmd.arg("--noflush");
        }
        if self.legacy {
            cmd.arg("--wait");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.restore_cmd()))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .with_context(|| format!("writing to {}", self.restore_cmd()))?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} rejected the rules ({}): {}\n--- input ---\n{}",
                self.restore_cmd(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                input.trim_end()
            );
        }
        Ok(())
    }
}

/// Whether `<cmd>-save` runs here (`Err` with why not), and whether it
/// shows any rule.
fn probe(cmd: &str) -> std::result::Result<bool, String> {
    let save = format!("{cmd}-save");
    let out = Command::new(&save)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{save}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{save}: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("-A ")))
}

/// Choose the iptables binaries for `family` in this namespace (see the
/// module docs), `FORCE_IPTABLES_BINARY` from the environment. Errors when
/// none works, or `FORCE_IPTABLES_BINARY` names something other than
/// `legacy` or `nft`.
pub fn detect(family: Family) -> Result<Iptables> {
    let force = std::env::var("FORCE_IPTABLES_BINARY").ok();
    detect_forced(family, force.as_deref())
}

/// [`detect`] with the `--force-iptables-binary` value given (`None`: choose).
pub fn detect_forced(family: Family, force: Option<&str>) -> Result<Iptables> {
    let base = family.command();
    let make = |command: String, legacy: bool| Iptables {
        family,
        command,
        legacy,
    };
    let legacy = format!("{base}-legacy");
    let nft = format!("{base}-nft");
    if let Some(force) = force {
        return match force {
            "legacy" => probe(&legacy)
                .map(|_| make(legacy.clone(), true))
                .map_err(|e| anyhow::anyhow!("FORCE_IPTABLES_BINARY=legacy (--force-iptables-binary or the environment), but {e}")),
            "nft" => probe(&nft)
                .map(|_| make(nft.clone(), false))
                .map_err(|e| anyhow::anyhow!("FORCE_IPTABLES_BINARY=nft (--force-iptables-binary or the environment), but {e}")),
            other => bail!(
                "FORCE_IPTABLES_BINARY={other:?} (--force-iptables-binary or the environment): the supported values are \"legacy\" and \"nft\""
            ),
        };
    }
    if probe(&legacy) == Ok(true) {
        return Ok(make(legacy, true));
    }
    let nft_err = match probe(&nft) {
        Ok(_) => return Ok(make(nft, false)),
        Err(e) => e,
    };
    let plain = probe(base);
    if plain.is_ok() {
        let version = Command::new(base)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        return Ok(make(base.to_string(), !version.contains("nf_tables")));
    }
    bail!(
        "no working {base} (divert init needs iptables in the image and CAP_NET_ADMIN): {nft_err}; {}",
        plain.unwrap_err()
    )
}

/// The lines of the `*TABLE` section of iptables-save output.
fn table_lines<'a>(save: &'a str, table: &str) -> Vec<&'a str> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            inside = t.trim() == table;
        } else if line == "COMMIT" {
            inside = false;
        } else if inside && !line.starts_with('#') {
            out.push(line);
        }
    }
    out
}

/// The mangle table's part of a transaction: make it hold `set.mangle`
/// (`--drop-invalid`'s [`ISTIO_DROP`] and the jump to it), replacing an
/// earlier run's, or, when `set` has none, remove what an earlier run left.
/// `None` when there is nothing to write.
fn mangle_transaction(save: &str, set: &RuleSet) -> Option<String> {
    let owned = [ISTIO_DROP];
    let exists = !existing_chains(save, "mangle", &owned).is_empty();
    if set.mangle.is_empty() && !exists {
        return None;
    }
    let mut s = String::from("*mangle\n");
    for d in deletions(save, "mangle", &owned, &set.mangle) {
        s.push_str(&d);
        s.push('\n');
    }
    if set.mangle.is_empty() {
        s.push_str(&format!("-F {ISTIO_DROP}\n-X {ISTIO_DROP}\n"));
    } else {
        s.push_str(&format!(":{ISTIO_DROP} - [0:0]\n"));
        for r in &set.mangle {
            s.push_str(&r.line());
            s.push('\n');
        }
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// An iptables-save snapshot of the mangle table as input that puts it
/// back exactly.
fn mangle_snapshot(before: &str) -> String {
    let lines = table_lines(before, "mangle");
    let mut s = String::from("*mangle\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// The chains of `owned` that exist in `save`'s `table`.
fn existing_chains(save: &str, table: &str, owned: &[&'static str]) -> Vec<&'static str> {
    let lines = table_lines(save, table);
    owned
        .iter()
        .copied()
        .filter(|c| {
            lines
                .iter()
                .any(|l| l.strip_prefix(':').and_then(|r| r.split(' ').next()) == Some(c))
        })
        .collect()
}

/// `-D` lines for the rules of ours that `save` holds in the built-in
/// chains of `table`: every jump to one of the chains we own there
/// (`owned`: [`CHAINS`] in nat, [`ISTIO_DROP`] in mangle), and each other
/// built-in-chain rule of `rules` (the interface rules), as many times as
/// `rules` has it.
fn deletions(save: &str, table: &str, owned: &[&str], rules: &[Rule]) -> Vec<String> {
    let mut wanted: Vec<String> = rules
        .iter()
        .filter(|r| !owned.contains(&r.chain) && !r.target().is_some_and(|t| owned.contains(&t)))
        .map(|r| r.saved_form())
        .collect();
    let mut out = Vec::new();
    for line in table_lines(save, table) {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split(' ').next().unwrap_or_default();
        if owned.contains(&chain) {
            continue;
        }
        let words: Vec<&str> = rest.split(' ').collect();
        let jumps_to_ours = words
            .windows(2)
            .any(|w| w[0] == "-j" && owned.contains(&w[1]));
        if jumps_to_ours {
            out.push(format!("-D {rest}"));
        } else if let Some(i) = wanted.iter().position(|w| w == line) {
            wanted.remove(i);
            out.push(format!("-D {rest}"));
        }
    }
    out
}

/// The transaction that makes the nat table hold `set`, whatever an
/// earlier run left: declare (create or empty) our chains, delete our
/// rules in built-in chains, write the rules.
pub fn apply_transaction(save: &str, set: &RuleSet) -> String {
    let mut s = String::from("*nat\n");
    for c in CHAINS {
        s.push_str(&format!(":{c} - [0:0]\n"));
    }
    for d in deletions(save, "nat", &CHAINS, &set.rules) {
        s.push_str(&d);
        s.push('\n');
    }
    for r in &set.rules {
        s.push_str(&r.line());
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// The transaction that removes ours from the nat table, or `None` when
/// nothing of ours is there.
pub fn cleanup_transaction(save: &str, set: &RuleSet) -> Option<String> {
    let dels = deletions(save, "nat", &CHAINS, &set.rules);
    let chains = existing_chains(save, "nat", &CHAINS);
    if dels.is_empty() && chains.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for d in dels {
        s.push_str(&d);
        s.push('\n');
    }
    // Empty every chain before deleting any: they jump to each other.
    for c in &chains {
        s.push_str(&format!("-F {c}\n"));
    }
    for c in &chains {
        s.push_str(&format!("-X {c}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Install `sets` (one per address family, each with its binaries), all or
/// nothing: on a failure, families already written get their nat table back
/// as it was.
pub fn apply(sets: &[(Iptables, RuleSet)]) -> Result<()> {
    let mut done: Vec<(&Iptables, String)> = Vec::new();
    for (ipt, set) in sets {
        let result = ipt.save_nat().and_then(|before| {
            let mut tx = apply_transaction(&before, set);
            let mut snapshot = snapshot_input(&before);
            let mangle_before = ipt.save_table("mangle")?;
            if let Some(m) = mangle_transaction(&mangle_before, set) {
                tx.push_str(&m);
                snapshot.push_str(&mangle_snapshot(&mangle_before));
            }
            ipt.restore(&tx, false).map(|()| snapshot)
        });
        match result {
            Ok(snapshot) => done.push((ipt, snapshot)),
            Err(e) => {
                for (prev, snapshot) in done.iter().rev() {
                    if let Err(re) = prev.restore(snapshot, true) {
                        tracing::error!(family = %prev.family, error = %format!("{re:#}"), "rollback failed");
                    }
                }
                return Err(e.context(format!("applying the {} rules", set.family)));
            }
        }
    }
    Ok(())
}

/// Remove ours from each family's nat table (what `set` renders tells
/// which interface rules are ours). Returns, per family, whether there was
/// anything to remove.
pub fn cleanup(sets: &[(Iptables, RuleSet)]) -> Result<Vec<bool>> {
    let mut removed = Vec::new();
    for (ipt, set) in sets {
        let before = ipt.save_nat()?;
        let mangle_before = ipt.save_table("mangle")?;
        let nothing = RuleSet {
            family: set.family,
            rules: Vec::new(),
            mangle: Vec::new(),
        };
        let mangle = mangle_transaction(&mangle_before, &nothing);
        let tx = match (cleanup_transaction(&before, set), mangle) {
            (None, None) => None,
            (nat, mangle) => Some(nat.unwrap_or_default() + &mangle.unwrap_or_default()),
        };
        match tx {
            Some(tx) => {
                ipt.restore(&tx, false)
                    .with_context(|| format!("removing the {} rules", set.family))?;
                removed.push(true);
            }
            None => removed.push(false),
        }
    }
    Ok(removed)
}

/// An iptables-save snapshot as input that puts the nat table back exactly
/// (empty when the table did not exist: an empty nat table).
fn snapshot_input(before: &str) -> String {
    if table_lines(before, "nat").is_empty() {
        "*nat\nCOMMIT\n".to_string()
    } else {
        before.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        iptables::render,
        policy::{Capture, Policy},
    };

    const SAVED: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
:USER_CHAIN - [0:0]
-A PREROUTING -i eth1 -j ISTIO_REDIRECT
-A PREROUTING -i eth1 -j RETURN
-A PREROUTING -i eth9 -j RETURN
-A OUTPUT -d 192.0.2.1/32 -j USER_CHAIN
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A USER_CHAIN -j RETURN
COMMIT
";

    fn kube_virt_eth1() -> RuleSet {
        let c = Capture {
            kube_virt_interfaces: vec!["eth1".into()],
            ..Capture::default()
        };
        render(&Policy::default(), &c, Family::V4).unwrap()
    }

    #[test]
    fn deletes_our_jumps_and_rendered_interface_rules_only() {
        let d = deletions(SAVED, "nat", &CHAINS, &kube_virt_eth1().rules);
        assert_eq!(
            d,
            vec![
                "-D PREROUTING -i eth1 -j ISTIO_REDIRECT",
                "-D PREROUTING -i eth1 -j RETURN",
                "-D OUTPUT -j ISTIO_OUTPUT",
            ]
        );
    }

    #[test]
    fn cleanup_empties_before_deleting_and_leaves_user_chains() {
        let tx = cleanup_transaction(SAVED, &kube_virt_eth1()).unwrap();
        let f = tx.find("-F ISTIO_INBOUND").unwrap();
        let x = tx.find("-X ").unwrap();
        assert!(f < x, "{tx}");
        assert!(!tx.contains("USER_CHAIN"), "{tx}");
        assert!(!tx.contains("eth9"), "{tx}");
        assert_eq!(cleanup_transaction("", &kube_virt_eth1()), None);
    }

    /// Stand-in iptables binaries in a temporary directory: `-save` prints
    /// `saved`, `-restore` logs its arguments and input to `<name>.log` and
    /// exits with `restore_status`.
    fn fake(
        dir: &std::path::Path,
        name: &str,
        family: Family,
        saved: &str,
        restore_status: i32,
    ) -> Iptables {
        use std::os::unix::fs::PermissionsExt;
        let base = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let scripts = [
            ("save", format!("#!/bin/sh\ncat <<'EOF'\n{saved}EOF\n")),
            (
                "restore",
                format!(
                    "#!/bin/sh\necho \"ARGS $*\" >> '{}'\ncat >> '{}'\nexit {restore_status}\n",
                    log.display(),
                    log.display()
                ),
            ),
        ];
        for (suffix, body) in scripts {
            let path = dir.join(format!("{name}-{suffix}"));
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Iptables {
            family,
            command: base.to_string_lossy().into_owned(),
            legacy: false,
        }
    }

    #[test]
    fn a_failed_family_puts_the_families_before_it_back() {
        let dir = std::env::temp_dir().join(format!("divert-apply-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = Policy::default();
        let v4 = fake(&dir, "ipt4", Family::V4, SAVED, 0);
        let v6 = fake(&dir, "ipt6", Family::V6, "", 1);
        let err = apply(&[
            (v4, render(&p, &Capture::default(), Family::V4).unwrap()),
            (v6, render(&p, &Capture::default(), Family::V6).unwrap()),
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("IPv6"), "{err:#}");
        let log4 = std::fs::read_to_string(dir.join("ipt4.log")).unwrap();
        let calls: Vec<&str> = log4.lines().filter(|l| l.starts_with("ARGS")).collect();
        // The transaction, then the snapshot in full (no --noflush: the nat
        // table is replaced by what it was).
        assert_eq!(calls, vec!["ARGS --noflush", "ARGS "], "{log4}");
        let snapshot_at = log4.rfind("ARGS \n").unwrap() + "ARGS \n".len();
        assert_eq!(
            &log4[snapshot_at..],
            SAVED,
            "the rollback input is the snapshot"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_mangle_table_holds_istio_drop_exactly_when_asked() {
        const MANGLE: &str = "*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_DROP - [0:0]
-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
-A ISTIO_DROP -j DROP
COMMIT
";
        let drop = Capture {
            drop_invalid: true,
            ..Capture::default()
        };
        let with = render(&Policy::default(), &drop, Family::V4).unwrap();
        let without = render(&Policy::default(), &Capture::default(), Family::V4).unwrap();
        // Asked, over an earlier run's: the old jump goes, the chain is
        // emptied and written again; someone else's rule stays.
        let tx = mangle_transaction(MANGLE, &with).unwrap();
        assert_eq!(
            tx,
            "*mangle\n-D PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n:ISTIO_DROP - [0:0]\n-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n-A ISTIO_DROP -j DROP\nCOMMIT\n"
        );
        // Not asked any more: removed.
        let tx = mangle_transaction(MANGLE, &without).unwrap();
        assert_eq!(
            tx,
            "*mangle\n-D PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n-F ISTIO_DROP\n-X ISTIO_DROP\nCOMMIT\n"
        );
        // Never asked, nothing there: the mangle table is not touched.
        assert_eq!(mangle_transaction("*mangle\nCOMMIT\n", &without), None);
        assert_eq!(mangle_transaction(SAVED, &without), None);
    }

    #[test]
    fn apply_declares_every_chain_and_replaces_old_jumps() {
        let tx = apply_transaction(SAVED, &kube_virt_eth1());
        for c in CHAINS {
            assert!(tx.contains(&format!(":{c} - [0:0]\n")), "{tx}");
        }
        assert!(!tx.contains("-N "), "{tx}");
        let del = tx.find("-D OUTPUT -j ISTIO_OUTPUT").unwrap();
        let add = tx.find("-A OUTPUT -j ISTIO_OUTPUT").unwrap();
        assert!(del < add, "{tx}");
    }
}
