//! The `PODS` map: which Kubernetes pod a registered namespace is.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData};
use divert_common::{maps, PodName, POD_NAMESPACE_LEN, POD_NAME_LEN};

use super::{absent, hash_map, Error, Maps, Result};

/// A Kubernetes pod: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Maps {
    /// Record that `netns_cookie` is the pod `namespace`/`name` (`PODS`), for
    /// `divert maps`, `divert stats` and the metric labels. Errors:
    /// [`Error::PodName`] when a name is longer than Kubernetes allows.
    pub fn set_pod(&mut self, netns_cookie: u64, namespace: &str, name: &str) -> Result<()> {
        let too_long = || Error::PodName {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let mut v = PodName {
            namespace: [0; POD_NAMESPACE_LEN],
            name: [0; POD_NAME_LEN],
        };
        // Keep a NUL at the end of each field.
        if namespace.len() >= POD_NAMESPACE_LEN || name.len() >= POD_NAME_LEN {
            return Err(too_long());
        }
        v.namespace[..namespace.len()].copy_from_slice(namespace.as_bytes());
        v.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut m: HashMap<&mut MapData, u64, PodName> = hash_map(&mut self.maps, maps::PODS)?;
        m.insert(netns_cookie, v, 0).map_err(|source| {
            Error::Map {
                map: maps::PODS,
                source,
            }
            .full()
        })
    }

    /// Forget `netns_cookie`'s pod; absent is fine.
    pub fn remove_pod(&mut self, netns_cookie: u64) -> Result<()> {
        let mut m: HashMap<&mut MapData, u64, PodName> = hash_map(&mut self.maps, maps::PODS)?;
        match m.remove(&netns_cookie) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(Error::Map {
                map: maps::PODS,
                source,
            }),
        }
    }

    /// Every recorded pod, by netns cookie.
    pub fn pods(&self) -> Result<BTreeMap<u64, PodRef>> {
        let m = self.read_hash::<u64, PodName>(maps::PODS)?;
        let text = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        m.iter()
            .map(|r| {
                r.map(|(cookie, v)| {
                    (
                        cookie,
                        PodRef {
                            namespace: text(&v.namespace),
                            name: text(&v.name),
                        },
                    )
                })
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Map {
                map: maps::PODS,
                source,
            })
    }
}
