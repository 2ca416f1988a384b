//! Applying a [`RuleSet`] to the calling thread's network namespace.
//!
//! * **Which iptables**: [`detect`] picks the binaries as istio-iptables
//!   does (`tools/istio-iptables/pkg/dependencies`, `DetectIptablesVersion`):
//!   `FORCE_IPTABLES_BINARY=legacy|nft` if set; otherwise the legacy
//!   binaries when legacy rules already exist in this namespace; otherwise
//!   the nft binaries; otherwise plain `iptables`.
//! * **Atomic**: one `iptables-restore --noflush` transaction per address
//!   family, touching only the tables the rules use (or, on cleanup, that
//!   hold something of ours). Chains are declared with `:CHAIN - [0:0]`,
//!   which creates them or empties them, and chains of ours the rules no
//!   longer use are removed, so a transaction also replaces an earlier
//!   run's rules: running twice leaves the same tables as running once. If
//!   the IPv6 transaction fails after the IPv4 one succeeded, the IPv4
//!   tables are restored from the snapshot taken before, so a namespace is
//!   either fully configured or as it was.
//! * **Exactly ours**: what belongs to divert is the chains of
//!   [`Table::chains`], every rule in a built-in chain that jumps to one of
//!   them, and the other built-in-chain rules the same flags render
//!   (interface rules, TPROXY's marks), one for one, matched in
//!   iptables-save's own spelling of them. [`cleanup`] removes those and
//!   nothing else.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{Family, Rule, RuleSet, Table};

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

/// An iptables-save snapshot of one table as input that puts it back
/// exactly (restored without `--noflush`, which replaces only the tables
/// the input names).
fn snapshot(save: &str, table: Table) -> String {
    let mut s = format!("*{table}\n");
    for l in table_lines(save, table.name()) {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// Our chains of `table` that exist in `save`.
fn existing_chains(save: &str, table: Table) -> Vec<&'static str> {
    let lines = table_lines(save, table.name());
    table
        .chains()
        .iter()
        .copied()
        .filter(|c| {
            lines
                .iter()
                .any(|l| l.strip_prefix(':').and_then(|r| r.split(' ').next()) == Some(c))
        })
        .collect()
}

/// The rules of `set` in `table`'s built-in chains that do not jump to our
/// chains (interface rules, TPROXY's marks): the rules of ours that only
/// their text tells apart from someone else's.
fn builtin_rules(set: &RuleSet, table: Table) -> Vec<&Rule> {
    set.in_table(table)
        .filter(|r| r.in_builtin_chain() && !r.jumps_to_ours())
        .collect()
}

/// The scratch chain [`saved_forms`] writes to.
const PROBE_CHAIN: &str = "DIVERT_PROBE";

/// How iptables-save prints each of `rules` (built-in-chain rules of one
/// table), in order: iptables canonicalises what it is given (`--mark
/// 1337` is saved as `--mark 0x539`, matches are reordered, defaults
/// added), so the only exact spelling is its own. The rules are written to
/// a scratch chain that nothing jumps to, read back, and the chain is
/// removed.
fn saved_forms(ipt: &Iptables, table: Table, rules: &[&Rule]) -> Result<Vec<String>> {
    if rules.is_empty() {
        return Ok(Vec::new());
    }
    let mut probe = format!("*{table}\n:{PROBE_CHAIN} - [0:0]\n");
    for r in rules {
        probe.push_str(&format!("-A {PROBE_CHAIN} {}\n", r.spec.join(" ")));
    }
    probe.push_str("COMMIT\n");
    let remove = format!("*{table}\n-F {PROBE_CHAIN}\n-X {PROBE_CHAIN}\nCOMMIT\n");
    ipt.restore(&probe, false)
        .context("learning iptables-save's spelling of our rules in built-in chains")?;
    let saved = ipt.save_table(table.name());
    ipt.restore(&remove, false)?;
    let prefix = format!("-A {PROBE_CHAIN} ");
    let saved = saved?;
    let spelled: Vec<&str> = table_lines(&saved, table.name())
        .into_iter()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect();
    if spelled.len() != rules.len() {
        bail!(
            "{}-save printed {} of the {} rules written to {PROBE_CHAIN} in {table}",
            ipt.command,
            spelled.len(),
            rules.len()
        );
    }
    Ok(rules
        .iter()
        .zip(spelled)
        .map(|(r, rest)| format!("-A {} {rest}", r.chain))
        .collect())
}

/// `-D` lines for the rules of ours that `save` holds in the built-in
/// chains of `table`: every jump to one of our chains there, and each line
/// of `ours` (our other built-in-chain rules as iptables-save prints them),
/// as many times as `ours` has it.
fn deletions(save: &str, table: Table, ours: &[String]) -> Vec<String> {
    let owned = table.chains();
    let mut wanted: Vec<&str> = ours.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for line in table_lines(save, table.name()) {
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
        } else if let Some(i) = wanted.iter().position(|w| *w == line) {
            wanted.remove(i);
            out.push(format!("-D {rest}"));
        }
    }
    out
}

/// The part of a transaction that makes `table` hold exactly `write` (the
/// table's rules of a [`RuleSet`]; none to clean up), whatever an earlier
/// run left: declare (create or empty) the chains `write` uses, delete our
/// rules in built-in chains (`ours`, see [`deletions`]), empty and delete
/// our chains it no longer uses, write the rules. `None` when there is
/// nothing to do, so a table divert never used is never touched.
fn table_transaction(save: &str, table: Table, write: &RuleSet, ours: &[String]) -> Option<String> {
    let declared = write.chains(table);
    let stale: Vec<&str> = existing_chains(save, table)
        .into_iter()
        .filter(|c| !declared.contains(c))
        .collect();
    let dels = deletions(save, table, ours);
    if declared.is_empty() && stale.is_empty() && dels.is_empty() {
        return None;
    }
    let mut s = format!("*{table}\n");
    for c in &declared {
        s.push_str(&format!(":{c} - [0:0]\n"));
    }
    for d in dels {
        s.push_str(&d);
        s.push('\n');
    }
    // Empty every stale chain before deleting any: they jump to each other.
    for c in &stale {
        s.push_str(&format!("-F {c}\n"));
    }
    for c in &stale {
        s.push_str(&format!("-X {c}\n"));
    }
    for r in write.in_table(table) {
        s.push_str(&r.line());
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// One family's transaction that makes its tables hold `write` (`set`
/// itself to apply, an empty set to clean up; `set` tells which rules in
/// built-in chains are ours), and the snapshot input that undoes it.
/// `None` when there is nothing to do.
fn family_transaction(
    ipt: &Iptables,
    set: &RuleSet,
    write: &RuleSet,
) -> Result<Option<(String, String)>> {
    let (mut tx, mut undo) = (String::new(), String::new());
    for table in Table::ALL {
        let save = ipt.save_table(table.name())?;
        // Learn the spelling only where there is something to delete.
        let builtin = builtin_rules(set, table);
        let ours = if table_lines(&save, table.name())
            .iter()
            .any(|l| l.starts_with("-A "))
        {
            saved_forms(ipt, table, &builtin)?
        } else {
            Vec::new()
        };
        if let Some(part) = table_transaction(&save, table, write, &ours) {
            tx.push_str(&part);
            undo.push_str(&snapshot(&save, table));
        }
    }
    Ok((!tx.is_empty()).then_some((tx, undo)))
}

/// Install `sets` (one per address family, each with its binaries), all or
/// nothing: on a failure, families already written get their tables back
/// as they were.
pub fn apply(sets: &[(Iptables, RuleSet)]) -> Result<()> {
    let mut done: Vec<(&Iptables, String)> = Vec::new();
    for (ipt, set) in sets {
        let result = family_transaction(ipt, set, set).and_then(|tx| match tx {
            Some((tx, undo)) => ipt.restore(&tx, false).map(|()| undo),
            None => Ok(String::new()),
        });
        match result {
            Ok(undo) => done.push((ipt, undo)),
            Err(e) => {
                for (prev, undo) in done.iter().rev() {
                    if undo.is_empty() {
                        continue;
                    }
                    if let Err(re) = prev.restore(undo, true) {
                        tracing::error!(family = %prev.family, error = %format!("{re:#}"), "rollback failed");
                    }
                }
                return Err(e.context(format!("applying the {} rules", set.family)));
            }
        }
    }
    Ok(())
}

/// Remove ours from each family's tables (what `set` renders tells which
/// rules in built-in chains are ours). Returns, per family, whether there
/// was anything to remove.
pub fn cleanup(sets: &[(Iptables, RuleSet)]) -> Result<Vec<bool>> {
    let mut removed = Vec::new();
    for (ipt, set) in sets {
        let nothing = RuleSet {
            family: set.family,
            rules: Vec::new(),
        };
        match family_transaction(ipt, set, &nothing)? {
            Some((tx, _)) => {
                ipt.restore(&tx, false)
                    .with_context(|| format!("removing the {} rules", set.family))?;
                removed.push(true);
            }
            None => removed.push(false),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        iptables::{render, ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_REDIRECT},
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
:ISTIO_OUTPUT_DNS - [0:0]
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
        render(&Policy::default(), &c, Family::V4)
    }

    /// The saved spelling of `-I PREROUTING 1 -i eth1 -j RETURN`.
    fn eth1_return() -> Vec<String> {
        vec!["-A PREROUTING -i eth1 -j RETURN".to_string()]
    }

    #[test]
    fn deletes_our_jumps_and_rendered_interface_rules_only() {
        let set = kube_virt_eth1();
        let builtin: Vec<String> = builtin_rules(&set, Table::Nat)
            .iter()
            .map(|r| r.line())
            .collect();
        assert_eq!(builtin, vec!["-I PREROUTING 1 -i eth1 -j RETURN"]);
        let d = deletions(SAVED, Table::Nat, &eth1_return());
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
        let nothing = RuleSet {
            family: Family::V4,
            rules: Vec::new(),
        };
        let tx = table_transaction(SAVED, Table::Nat, &nothing, &eth1_return()).unwrap();
        let f = tx.find("-F ISTIO_INBOUND").unwrap();
        let x = tx.find("-X ").unwrap();
        assert!(f < x, "{tx}");
        assert!(tx.contains("-X ISTIO_OUTPUT_DNS"), "{tx}");
        assert!(!tx.contains("USER_CHAIN"), "{tx}");
        assert!(!tx.contains("eth9"), "{tx}");
        assert_eq!(table_transaction("", Table::Nat, &nothing, &[]), None);
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
            (v4, render(&p, &Capture::default(), Family::V4)),
            (v6, render(&p, &Capture::default(), Family::V6)),
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
            snapshot(SAVED, Table::Nat),
            "the rollback input is the snapshot"
        );
        assert!(snapshot(SAVED, Table::Nat).contains("-A USER_CHAIN -j RETURN\n"));
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
        let with = render(&Policy::default(), &drop, Family::V4);
        let without = render(&Policy::default(), &Capture::default(), Family::V4);
        // Asked, over an earlier run's: the old jump goes, the chain is
        // emptied and written again; someone else's rule stays.
        let tx = table_transaction(MANGLE, Table::Mangle, &with, &[]).unwrap();
        assert_eq!(
            tx,
            "*mangle\n:ISTIO_DROP - [0:0]\n-D PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n-A ISTIO_DROP -j DROP\nCOMMIT\n"
        );
        // Not asked any more: removed.
        let tx = table_transaction(MANGLE, Table::Mangle, &without, &[]).unwrap();
        assert_eq!(
            tx,
            "*mangle\n-D PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n-F ISTIO_DROP\n-X ISTIO_DROP\nCOMMIT\n"
        );
        // Never asked, nothing there: the mangle table is not touched.
        assert_eq!(
            table_transaction("*mangle\nCOMMIT\n", Table::Mangle, &without, &[]),
            None
        );
        assert_eq!(table_transaction(SAVED, Table::Mangle, &without, &[]), None);
    }

    #[test]
    fn apply_declares_the_chains_it_uses_and_replaces_old_jumps() {
        let set = kube_virt_eth1();
        let tx = table_transaction(SAVED, Table::Nat, &set, &eth1_return()).unwrap();
        for c in [
            ISTIO_INBOUND,
            ISTIO_REDIRECT,
            ISTIO_IN_REDIRECT,
            ISTIO_OUTPUT,
        ] {
            assert!(tx.contains(&format!(":{c} - [0:0]\n")), "{tx}");
        }
        // DNS capture is off: an earlier run's ISTIO_OUTPUT_DNS goes.
        assert!(!tx.contains(":ISTIO_OUTPUT_DNS"), "{tx}");
        assert!(tx.contains("-X ISTIO_OUTPUT_DNS\n"), "{tx}");
        assert!(!tx.contains("-N "), "{tx}");
        let del = tx.find("-D OUTPUT -j ISTIO_OUTPUT").unwrap();
        let add = tx.find("-A OUTPUT -j ISTIO_OUTPUT").unwrap();
        assert!(del < add, "{tx}");
    }
}
