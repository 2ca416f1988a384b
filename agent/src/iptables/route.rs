//! TPROXY's policy routing, as istio-iptables sets it up
//! (`tools/istio-iptables/pkg/capture`, `configureTProxyRoutes`): packets
//! with the TPROXY mark are looked up in their own table, whose one route
//! delivers every destination locally, so the proxy's transparent socket
//! receives them.
//!
//! Per address family: `ip rule add fwmark MARK lookup TABLE` and `ip
//! route add local default dev lo table TABLE`. Written with iproute2's
//! `ip`, in the calling thread's network namespace.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::Family;
use crate::policy::Tproxy;

fn family_flag(family: Family) -> &'static str {
    match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

/// The `ip` commands that `verb` (`add`, `del`) `family`'s routing (with
/// `add`, what `--dry-run` prints): the rule, then the route.
pub fn commands(t: &Tproxy, family: Family, verb: &str) -> [Vec<String>; 2] {
    let f = family_flag(family);
    let (mark, table) = (t.mark.to_string(), t.route_table.to_string());
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    [
        words(&[f, "rule", verb, "fwmark", &mark, "lookup", &table]),
        words(&[
            f, "route", verb, "local", "default", "dev", "lo", "table", &table,
        ]),
    ]
}

fn ip(args: &[String]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2), which TPROXY mode needs")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `family` has the rule `fwmark MARK lookup TABLE`.
fn has_rule(t: &Tproxy, family: Family) -> Result<bool> {
    let out = ip(&[
        family_flag(family).into(),
        "rule".into(),
        "show".into(),
        "fwmark".into(),
        t.mark.to_string(),
        "lookup".into(),
        t.route_table.to_string(),
    ])?;
    Ok(!out.trim().is_empty())
}

/// Whether the table holds the local default route (a table that does not
/// exist holds nothing).
fn has_route(t: &Tproxy, family: Family) -> bool {
    ip(&[
        family_flag(family).into(),
        "route".into(),
        "show".into(),
        "table".into(),
        t.route_table.to_string(),
    ])
    .is_ok_and(|out| out.lines().any(|l| l.starts_with("local default dev lo")))
}

/// What [`add`] added: the `ip … del` commands that take it away again.
#[must_use = "undo it when what follows fails"]
pub struct Added(Vec<Vec<String>>);

impl Added {
    /// Remove what [`add`] added (and nothing that was there before it),
    /// best effort.
    pub fn undo(self) {
        for cmd in self.0.into_iter().rev() {
            if let Err(e) = ip(&cmd) {
                tracing::error!(error = %format!("{e:#}"), "undoing TPROXY's policy routing");
            }
        }
    }
}

/// Put the rule and route of each of `families` in place, all or nothing:
/// what is there already is kept (running twice adds nothing), and on a
/// failure what this call added is removed again.
pub fn add(t: &Tproxy, families: &[Family]) -> Result<Added> {
    let mut added = Added(Vec::new());
    let mut step = || -> Result<()> {
        for &f in families {
            let present = [has_rule(t, f)?, has_route(t, f)];
            let steps = commands(t, f, "add").into_iter().zip(commands(t, f, "del"));
            for ((add, del), there) in steps.zip(present) {
                if there {
                    continue;
                }
                ip(&add)?;
                added.0.push(del);
            }
        }
        Ok(())
    };
    match step() {
        Ok(()) => Ok(added),
        Err(e) => {
            added.undo();
            Err(e.context("setting up TPROXY's policy routing"))
        }
    }
}

/// Remove the rule and route of each of `families`; what is absent is not
/// an error. Returns whether anything was removed.
pub fn remove(t: &Tproxy, families: &[Family]) -> Result<bool> {
    let mut removed = false;
    for &f in families {
        let [rule, route] = commands(t, f, "del");
        // A family without IPv6 (`ip -6` failing) has nothing to remove.
        while has_rule(t, f).unwrap_or(false) {
            ip(&rule)?;
            removed = true;
        }
        if has_route(t, f) {
            ip(&route)?;
            removed = true;
        }
    }
    Ok(removed)
}
