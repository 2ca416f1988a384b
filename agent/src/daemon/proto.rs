//! The registration protocol between `divert init` and `divert daemon`:
//! one JSON object per line each way over a Unix stream socket, one request
//! per connection.
//!
//! ```text
//! → {"version":2,"op":"register","policy":{…}}      ← {"version":2,"ok":true,"netns_cookie":…,"registered":true}
//! → {"version":2,"op":"unregister"}                  ← {"version":2,"ok":true,"netns_cookie":…,"registered":false}
//! → {"version":2,"op":"status"}                      ← {"version":2,"ok":true,"netns_cookie":…,"registered":…}
//! any failure                                        ← {"version":2,"ok":false,"error":"…"}
//! ```
//!
//! A request names no namespace, and a field the protocol does not define
//! is refused: the daemon takes the caller's network namespace from the
//! socket's `SO_PEERCRED` (pid → /proc/pid/ns/net), so a pod can only
//! configure itself. `policy` is held to the rules of the command line
//! ([`crate::policy::Policy::validate`]); `policy.local_addrs` must be empty
//! (the daemon reads the namespace's own addresses). `policy.owner_groups`
//! is optional (absent: every group, so requests without it read as they
//! did), `{"only":[GID…]}` or `{"all_except":[GID…]}`, GIDs as decimal
//! strings, at most 64, no names. `policy.inbound_ports` (`"all"` or
//! `{"list":[PORT…]}`; absent: no inbound capture) and
//! `policy.inbound_exclude_ports` are optional too; with inbound capture
//! the daemon attaches socket lookup to the caller's namespace.
//!
//! A request line is at most [`MAX_REQUEST_BYTES`] and must arrive whole
//! within [`REQUEST_DEADLINE`]; a refusal never quotes what was sent.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// The protocol version this build speaks; a request with another is refused.
/// 2: the policy is the outbound policy only (1 also carried the capture
/// settings, which the daemon never applied).
pub const VERSION: u32 = 2;
/// Default socket path (a hostPath directory shared with the pods' init
/// containers).
pub const DEFAULT_SOCKET: &str = "/var/run/divert/divert.sock";
/// No read or write on the socket waits longer than this.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request line the daemon reads, newline excluded: 64 KiB,
/// room for about 3,000 IPv4 ranges (Istio's own limits are far lower).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A request line must have arrived whole this long after the connection
/// was accepted, however slowly it trickles in.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// What a caller asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Register (or replace) the caller's namespace's policy.
    Register {
        policy: Box<Policy>,
        /// Who asks, as `divert maps` shows it: `divert init` when absent
        /// (what every `divert init` sends), `cni` from `divert-cni`. A
        /// label only: it changes nothing of what the daemon does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        registrar: Option<Registrar>,
    },
    /// Remove the caller's namespace's policy.
    Unregister,
    /// Whether the caller's namespace is registered.
    Status,
}

/// Who sends a registration ([`Op::Register`]'s `registrar`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registrar {
    /// `divert init` (or `divert istio-iptables`) in the pod.
    Init,
    /// `divert-cni`, for the pod's sandbox.
    Cni,
}

impl Registrar {
    /// How the registration is recorded.
    pub fn registered_by(registrar: Option<Registrar>) -> crate::ebpf::RegisteredBy {
        match registrar {
            None | Some(Registrar::Init) => crate::ebpf::RegisteredBy::Init,
            Some(Registrar::Cni) => crate::ebpf::RegisteredBy::Cni,
        }
    }
}

/// One request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    /// Parse one request line, refusing any field the protocol does not
    /// define (a request naming a namespace, a pid, …).
    ///
    /// Errors say what is wrong and where (line and column), never what
    /// was sent: the text is the caller's, and may be anything.
    pub fn parse(line: &str) -> Result<Request, String> {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| described(&e))?;
        if v.keys()
            .any(|k| !["version", "op", "policy", "registrar"].contains(&k.as_str()))
        {
            return Err(
                "a field that is not part of the protocol (only version, op, policy and registrar are; the daemon identifies the caller itself)"
                    .into(),
            );
        }
        if v.contains_key("registrar") && v.get("op") != Some(&"register".into()) {
            return Err("registrar belongs to a registration only".into());
        }
        serde_json::from_value(serde_json::Value::Object(v)).map_err(|e| {
            format!(
                "not a request of protocol version {VERSION}: {}",
                described(&e)
            )
        })
    }
}

/// A JSON error without the input it quotes: its kind and position.
fn described(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "unreadable",
        Category::Syntax => "not JSON",
        Category::Data => "a value of the wrong type, a missing field or an unknown op",
        Category::Eof => "cut short",
    };
    if e.line() == 0 {
        what.to_string()
    } else {
        format!("{what} (line {} column {})", e.line(), e.column())
    }
}

/// One response line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    /// The caller's netns cookie, as the daemon identified it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    /// Whether the namespace has a policy after the request.
    #[serde(default)]
    pub registered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Failure talking to the daemon (not the daemon's refusal, which is a
/// [`Response`] with `ok: false`).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the divert daemon at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the divert daemon at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the request for the divert daemon at {path} is {len} bytes, more than the {} it reads: register fewer ranges or ports", MAX_REQUEST_BYTES)]
    TooLong { path: String, len: usize },
    #[error("the divert daemon at {path} answered {line:?}: {source}")]
    Answer {
        path: String,
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Send `op` to the daemon at `socket` and read its answer.
pub fn call(socket: &Path, op: Op) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut line = serde_json::to_string(&Request {
        version: VERSION,
        op,
    })
    .expect("a request serialises");
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ClientError::TooLong {
            path,
            len: line.len(),
        });
    }
    line.push('\n');
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: path.clone(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| ClientError::Answer {
        path: path.clone(),
        line: answer.trim().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_name_no_namespace() {
        let r = Request {
            version: VERSION,
            op: Op::Register {
                policy: Box::default(),
                registrar: None,
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.starts_with(r#"{"version":2,"op":"register","policy":{"#),
            "{text}"
        );
        assert!(!text.contains("registrar"), "{text}");
        assert_eq!(Request::parse(&text).unwrap(), r);
        // divert-cni says who it is; an unknown registrar is refused.
        let cni = Request {
            version: VERSION,
            op: Op::Register {
                policy: Box::default(),
                registrar: Some(Registrar::Cni),
            },
        };
        let text = serde_json::to_string(&cni).unwrap();
        assert!(text.contains(r#""registrar":"cni""#), "{text}");
        assert_eq!(Request::parse(&text).unwrap(), cni);
        assert!(Request::parse(&text.replace("\"cni\"", "\"kubelet\"")).is_err());
        assert!(
            Request::parse(r#"{"version":2,"op":"status","registrar":"cni"}"#).is_err(),
            "a registrar on another op"
        );
        let status = Request::parse(r#"{"version":2,"op":"status"}"#).unwrap();
        assert_eq!(status.op, Op::Status);
    }

    #[test]
    fn a_request_that_names_a_namespace_is_refused() {
        for bad in [
            r#"{"version":2,"op":"status","netns_cookie":4096}"#,
            r#"{"version":2,"op":"unregister","pid":1}"#,
            r#"{"version":2,"op":"reboot"}"#,
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capture_settings_in_a_registration_are_refused_not_ignored() {
        // The eBPF backend applies the outbound policy only: a request that
        // carries inbound capture or interfaces is refused whole.
        let mut v =
            serde_json::json!({"version": VERSION, "op": "register", "policy": Policy::default()});
        assert!(Request::parse(&v.to_string()).is_ok());
        for (field, value) in [
            (
                "inbound",
                serde_json::json!({"mode": "Redirect", "ports": "All", "exclude_ports": []}),
            ),
            ("kube_virt_interfaces", serde_json::json!(["eth1"])),
            ("exclude_interfaces", serde_json::json!(["eth2"])),
        ] {
            v["policy"] = serde_json::to_value(Policy::default()).unwrap();
            v["policy"][field] = value;
            assert!(
                Request::parse(&v.to_string()).is_err(),
                "{field} was accepted"
            );
        }
    }

    use crate::policy::{PolicyArgs, Source};
    use proptest::prelude::*;

    fn request_origin(field: &str) -> Source {
        Source::Request(field.to_string())
    }

    /// A command-line policy (random flag values the parser accepts).
    fn cli_policy() -> impl Strategy<Value = Policy> {
        let ports = prop::collection::vec(1u16.., 0..5);
        let ids = prop::collection::vec(any::<u32>(), 1..=8);
        let cidr = (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, l)| format!("{}.{}.{}.{}/{l}", a[0], a[1], a[2], a[3]));
        let cidrs = prop::collection::vec(cidr, 0..4);
        (
            1u16..,
            ids,
            ports.clone(),
            ports,
            cidrs.clone(),
            cidrs,
            any::<bool>(),
        )
            .prop_filter_map(
                "a policy the flags give",
                |(port, uids, q, o, i, x, all)| {
                    let join = |v: Vec<String>| v.join(",");
                    let nums = |v: &[u16]| join(v.iter().map(u16::to_string).collect());
                    PolicyArgs {
                        proxy_port: port.to_string(),
                        inbound_capture_port: "15006".into(),
                        inbound_tunnel_port: "15008".into(),
                        proxy_uids: join(uids.iter().map(u32::to_string).collect()),
                        proxy_gids: String::new(),
                        include_ranges: if all { "*".into() } else { join(i) },
                        exclude_ranges: join(x),
                        include_ports: nums(&q),
                        exclude_ports: nums(&o),
                        owner_groups: "*".into(),
                        owner_groups_exclude: String::new(),
                        inbound_ports: String::new(),
                        inbound_exclude_ports: String::new(),
                        redirect_dns: false,
                        capture_all_dns: false,
                        resolv_conf: "/etc/resolv.conf".into(),
                    }
                    .to_policy_from(&request_origin)
                    .ok()
                },
            )
    }

    proptest! {
        /// Every policy the command line gives is accepted on the socket,
        /// exactly as it is.
        #[test]
        fn command_line_policies_are_valid_requests(p in cli_policy()) {
            prop_assert!(p.validate(&request_origin).is_ok());
            let line = serde_json::to_string(&Request { version: VERSION, op: Op::Register { policy: Box::new(p.clone()), registrar: None } }).unwrap();
            let back = Request::parse(&line).unwrap();
            prop_assert_eq!(back.op, Op::Register { policy: Box::new(p), registrar: None });
        }

        /// Random and mutated request lines never panic the parser or the
        /// validation, and every request accepted is a policy the command
        /// line itself gives (its flags parse back to it) and whose kernel
        /// header can be built.
        #[test]
        fn mutated_requests_never_panic_and_accepted_ones_are_command_line_policies(
            p in cli_policy(),
            cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            junk in ".{0,40}",
        ) {
            let mut line = serde_json::to_string(&Request { version: VERSION, op: Op::Register { policy: Box::new(p), registrar: None } }).unwrap().into_bytes();
            for (at, byte) in cuts {
                let i = at.index(line.len());
                line[i] = byte;
            }
            for text in [String::from_utf8_lossy(&line).into_owned(), junk] {
                if let Ok(Request { op: Op::Register { policy, .. }, .. }) = Request::parse(&text) {
                    if policy.validate(&request_origin).is_ok() {
                        let again = PolicyArgs::of(&policy).to_policy_from(&request_origin).unwrap();
                        prop_assert_eq!(&again, policy.as_ref());
                        let _ = crate::ebpf::header(&policy);
                    }
                }
            }
        }

        /// Whatever a request's numbers are, validation answers (never
        /// panics), and refuses every value the flags refuse.
        #[test]
        fn out_of_range_values_are_refused(
            uids in prop::collection::vec(any::<u32>(), 0..20),
            port in any::<u16>(),
            exclude in prop::collection::vec(any::<u16>(), 0..4),
        ) {
            let p = Policy { proxy_uids: uids.clone(), proxy_port: port, exclude_ports: exclude.clone(), ..Policy::default() };
            let ok = p.validate(&request_origin).is_ok();
            let mut dedup = uids.clone();
            dedup.sort_unstable();
            dedup.dedup();
            let mut ex = exclude.clone();
            ex.sort_unstable();
            ex.dedup();
            let want = port != 0 && !uids.is_empty() && uids.len() <= 8 && dedup.len() == uids.len()
                && !exclude.contains(&0) && ex.len() == exclude.len();
            prop_assert_eq!(ok, want, "{:?}", p.validate(&request_origin));
        }
    }

    #[test]
    fn owner_groups_are_gids_at_most_64_none_repeated() {
        let with = |groups: crate::policy::OwnerGroups| Policy {
            owner_groups: groups,
            ..Policy::default()
        };
        use crate::policy::OwnerGroups::{AllExcept, Only};
        let gids = |n: u32| (0..n).map(|g| g.to_string()).collect::<Vec<_>>();
        assert!(with(Only(gids(64))).validate(&request_origin).is_ok());
        assert!(with(AllExcept(vec!["2000".into()]))
            .validate(&request_origin)
            .is_ok());
        for (bad, says) in [
            (Only(gids(65)), "65 groups"),
            (Only(vec!["java".into()]), "GIDs"),
            (AllExcept(vec!["7".into(), "7".into()]), "repeated"),
        ] {
            let e = with(bad.clone())
                .validate(&request_origin)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(says) && e.contains("policy.owner_groups"),
                "{bad:?}: {e}"
            );
        }
        // On the wire: absent when every group, so older daemons read it.
        let v = serde_json::to_value(with(Only(vec!["2000".into()]))).unwrap();
        assert_eq!(v["owner_groups"], serde_json::json!({"only": ["2000"]}));
        assert!(serde_json::to_value(Policy::default()).unwrap()["owner_groups"].is_null());
    }

    #[test]
    fn dns_capture_on_the_wire_is_held_to_what_resolv_conf_gives() {
        let with = |v: serde_json::Value| -> Result<Policy, String> {
            let mut p = serde_json::to_value(Policy::default()).unwrap();
            p["dns"] = v;
            let p: Policy = serde_json::from_value(p).map_err(|e| e.to_string())?;
            p.validate(&request_origin).map_err(|e| e.to_string())?;
            Ok(p)
        };
        let ok = with(serde_json::json!({
            "capture_all": false, "servers_v4": ["10.96.0.10"], "servers_v6": ["fd00::a"]
        }))
        .unwrap();
        assert_eq!(ok.dns.unwrap().servers().count(), 2);
        assert!(with(serde_json::json!({"capture_all": true})).is_ok());
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}")).collect();
        for (bad, says) in [
            (
                serde_json::json!({"capture_all": true, "servers_v4": ["10.0.0.1"]}),
                "takes no nameservers",
            ),
            (serde_json::json!({"capture_all": false}), "no nameservers"),
            (
                serde_json::json!({"capture_all": false, "servers_v4": ["fd00::a"]}),
                "IPv4 addresses only",
            ),
            (
                serde_json::json!({"capture_all": false, "servers_v4": ["10.0.0.1", "10.0.0.1"]}),
                "repeated",
            ),
            (
                serde_json::json!({"capture_all": false, "servers_v4": many}),
                "17 nameservers",
            ),
            (
                serde_json::json!({"capture_all": false, "servers_v4": ["kube-dns"]}),
                "not an IP address",
            ),
            (
                serde_json::json!({"capture_all": false, "servers_v6": ["::ffff:10.0.0.1"]}),
                "IPv4-mapped",
            ),
            (
                serde_json::json!({"capture_all": false, "servers": ["10.0.0.1"]}),
                "unknown field",
            ),
        ] {
            let e = with(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // Off: absent from the request, as before DNS capture existed.
        assert!(serde_json::to_value(Policy::default()).unwrap()["dns"].is_null());
    }

    #[test]
    fn a_refusal_names_the_field_and_never_quotes_the_request() {
        let secret = "SECRET-42";
        for line in [
            secret.to_string(),
            format!(r#"{{"version":2,"op":"status","{secret}":1}}"#),
            format!(r#"{{"version":2,"op":"{secret}"}}"#),
            format!(r#"{{"version":"{secret}","op":"status"}}"#),
        ] {
            let e = Request::parse(&line).unwrap_err();
            assert!(!e.contains(secret), "{line}: {e}");
        }
        let p = Policy {
            local_addrs: vec!["10.1.1.1".parse().unwrap()],
            ..Policy::default()
        };
        let e = p.validate(&request_origin).unwrap_err().to_string();
        assert!(
            e.contains("policy.local_addrs of the registration request"),
            "{e}"
        );
    }
}
