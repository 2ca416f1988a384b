//! Garbage collection: the policy of a network namespace that no longer
//! exists is removed by the next sweep, so it is gone within one interval
//! (`--gc-interval`, default [`DEFAULT_INTERVAL`]) of the namespace's last
//! holder going away, plus the sweep itself.
//!
//! A sweep reads the registered cookies first, then the live ones, and
//! removes the registered cookies that are not live; a namespace registered
//! during the sweep is not in the first set, so it is never removed by
//! mistake. A namespace is live when a process is in it (`/proc/<pid>/ns/net`
//! of every thread-group leader: a pod's pause process holds its namespace)
//! or it is bind-mounted under /run/netns or /var/run/netns (`ip netns`,
//! CNI plugins). The daemon needs the host's pid namespace (`hostPID`) to
//! see the pods' processes, as it does for `SO_PEERCRED`. Its cookie is read
//! by entering each live namespace once per sweep on a throwaway thread
//! (no cache: a freed namespace's inode number is reused).

use std::{collections::HashSet, time::Duration};

use super::Registry;

/// How often the daemon sweeps by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// The netns cookie of every live network namespace
/// ([`crate::netns::live_namespaces`]).
pub fn live_netns_cookies() -> std::io::Result<HashSet<u64>> {
    Ok(crate::netns::live_namespaces()?.into_keys().collect())
}

impl Registry {
    /// One sweep: remove the policy of every registered namespace that is
    /// no longer live. Returns the cookies removed.
    pub fn sweep(&self) -> anyhow::Result<Vec<u64>> {
        let registered = self.lock().registered_cookies()?;
        if registered.is_empty() {
            return Ok(Vec::new());
        }
        let live = live_netns_cookies()?;
        let mut removed = Vec::new();
        for c in registered.into_iter().filter(|c| !live.contains(c)) {
            // Removes the pod identity and inbound capture with the policy.
            let removed_now = self.forget(c)?;
            if removed_now {
                self.health().gc_removed.inc();
                tracing::info!(netns_cookie = c, "namespace gone: policy removed");
                removed.push(c);
            }
        }
        Ok(removed)
    }

    /// Sweep every `interval` (on the blocking pool: a sweep enters
    /// namespaces and writes maps) until `shutdown` is cancelled.
    pub async fn collect_garbage(
        self: std::sync::Arc<Self>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let registry = self.clone();
            match tokio::task::spawn_blocking(move || registry.sweep()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "garbage collection sweep")
                }
                Err(e) => tracing::error!(error = %e, "garbage collection sweep panicked"),
            }
        }
    }
}
