//! The `COUNTERS` map: connections and bytes per (namespace, destination,
//! port, verdict).

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{HashMap, MapData};
use divert_common::{maps, CounterKey, CounterValue, Verdict};

use super::{absent, Error, Maps, Result};
use crate::policy::canonical;

/// One destination's counters in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Counter {
    pub netns_cookie: u64,
    /// Destination as dialled (IPv4-mapped shown as IPv4).
    pub destination: IpAddr,
    pub port: u16,
    /// `redirected`, `inbound_capture`, `dns` or `passthrough` (`Verdict::name`).
    pub verdict: &'static str,
    /// Connects judged.
    pub connections: u64,
    /// Payload bytes sent and acknowledged, of connections closed so far.
    pub bytes_sent: u64,
    /// Payload bytes received, of connections closed so far.
    pub bytes_received: u64,
}

impl Maps {
    /// Remove every `COUNTERS` series of `netns_cookie` (a namespace that is
    /// unregistered is no longer counted; its old series would only linger
    /// until the LRU evicted them).
    pub(super) fn remove_counters(&mut self, netns_cookie: u64) -> Result<()> {
        let m = self
            .maps
            .get_mut(maps::COUNTERS)
            .ok_or(Error::MissingMap(maps::COUNTERS))?;
        let mut counters: HashMap<&mut MapData, CounterKey, CounterValue> = HashMap::try_from(m)
            .map_err(|source| Error::Map {
                map: maps::COUNTERS,
                source,
            })?;
        let keys: Vec<CounterKey> = counters
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for k in keys {
            match counters.remove(&k) {
                Ok(()) => {}
                Err(e) if absent(&e) => {}
                Err(source) => {
                    return Err(Error::Map {
                        map: maps::COUNTERS,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Per-destination counters, sorted by namespace, destination, port and
    /// verdict.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        let map = self
            .maps
            .get(maps::COUNTERS)
            .ok_or(Error::MissingMap(maps::COUNTERS))?;
        let counters: HashMap<&MapData, CounterKey, CounterValue> = HashMap::try_from(map)
            .map_err(|source| Error::Map {
                map: maps::COUNTERS,
                source,
            })?;
        let mut sums: BTreeMap<CounterKey, CounterValue> = BTreeMap::new();
        for entry in counters.iter() {
            let (key, value) = entry.map_err(|source| Error::Map {
                map: maps::COUNTERS,
                source,
            })?;
            sums.insert(key, value);
        }
        Ok(sums
            .into_iter()
            .map(|(k, v)| Counter {
                netns_cookie: k.netns_cookie,
                destination: canonical(IpAddr::from(k.addr)),
                port: k.port,
                verdict: Verdict::from_code(k.verdict).name(),
                connections: v.connections,
                bytes_sent: v.bytes_sent,
                bytes_received: v.bytes_received,
            })
            .collect())
    }
}
