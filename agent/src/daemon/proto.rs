//! The registration protocol between `divert init` and `divert daemon`:
//! one JSON object per line each way over a Unix stream socket, one request
//! per connection.
//!
//! ```text
//! → {"version":1,"op":"register","policy":{…}}      ← {"version":1,"ok":true,"netns_cookie":…,"registered":true}
//! → {"version":1,"op":"unregister"}                  ← {"version":1,"ok":true,"netns_cookie":…,"registered":false}
//! → {"version":1,"op":"status"}                      ← {"version":1,"ok":true,"netns_cookie":…,"registered":…}
//! any failure                                        ← {"version":1,"ok":false,"error":"…"}
//! ```
//!
//! A request names no namespace, and a field the protocol does not define
//! is refused: the daemon takes the caller's network namespace from the
//! socket's `SO_PEERCRED` (pid → /proc/pid/ns/net), so a pod can only
//! configure itself. `policy.local_addrs` is ignored; the daemon reads the
//! namespace's own addresses.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// The protocol version this build speaks; a request with another is refused.
pub const VERSION: u32 = 1;
/// Default socket path (a hostPath directory shared with the pods' init
/// containers).
pub const DEFAULT_SOCKET: &str = "/var/run/divert/divert.sock";
/// No read or write on the socket waits longer than this.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What a caller asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Register (or replace) the caller's namespace's policy.
    Register { policy: Box<Policy> },
    /// Remove the caller's namespace's policy.
    Unregister,
    /// Whether the caller's namespace is registered.
    Status,
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
    pub fn parse(line: &str) -> Result<Request, String> {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| e.to_string())?;
        if let Some(k) = v
            .keys()
            .find(|k| !["version", "op", "policy"].contains(&k.as_str()))
        {
            return Err(format!(
                "field {k:?} is not part of the protocol (the daemon identifies the caller itself)"
            ));
        }
        serde_json::from_value(serde_json::Value::Object(v)).map_err(|e| e.to_string())
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
    let mut line = serde_json::to_string(&Request {
        version: VERSION,
        op,
    })
    .expect("a request serialises");
    line.push('\n');
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
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.starts_with(r#"{"version":1,"op":"register","policy":{"#),
            "{text}"
        );
        assert_eq!(Request::parse(&text).unwrap(), r);
        let status = Request::parse(r#"{"version":1,"op":"status"}"#).unwrap();
        assert_eq!(status.op, Op::Status);
    }

    #[test]
    fn a_request_that_names_a_namespace_is_refused() {
        for bad in [
            r#"{"version":1,"op":"status","netns_cookie":4096}"#,
            r#"{"version":1,"op":"unregister","pid":1}"#,
            r#"{"version":1,"op":"reboot"}"#,
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
    }
}
