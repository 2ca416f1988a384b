//! A fake Kubernetes API server for the tests: the few paths the pod
//! watch and the CNI plugin use (list and watch pods, get a pod, get the
//! namespace, create events), over real HTTP to the real kube-rs client,
//! serving JSON the test gives it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// An HTTP/1.1 server with the few API paths the pod watch uses: list and
/// watch pods, get a namespace, create events. Watch events are pushed by
/// the test into a log that every watch replays from the resourceVersion it
/// asks for, as the API server does (so a client that reconnects, or a
/// daemon that restarts, misses nothing); created events are recorded.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<State>,
    pub events: Arc<Mutex<Vec<Value>>>,
}

struct State {
    pods: Mutex<Vec<Value>>,
    namespace: Value,
    /// Every watch event pushed, in order, and a wake-up for the watches.
    log: Mutex<Vec<Value>>,
    pushed: std::sync::Condvar,
    events: Arc<Mutex<Vec<Value>>>,
}

/// A pod's `metadata.resourceVersion` as a number (0 when absent).
fn rv(pod: &Value) -> u64 {
    pod["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl FakeApi {
    pub fn start(pods: Vec<Value>, namespace: Value) -> FakeApi {
        Self::serve_on(TcpListener::bind("127.0.0.1:0").unwrap(), pods, namespace)
    }

    /// [`FakeApi::start`] on 127.0.0.1 of `netns`, for clients that run
    /// there (a CNI plugin that a runtime in that namespace executes).
    pub fn start_in(netns: &crate::Netns, pods: Vec<Value>, namespace: Value) -> FakeApi {
        let listener = netns
            .enter(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        Self::serve_on(listener, pods, namespace)
    }

    fn serve_on(listener: TcpListener, pods: Vec<Value>, namespace: Value) -> FakeApi {
        let addr = listener.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            pods: Mutex::new(pods),
            namespace,
            log: Mutex::new(Vec::new()),
            pushed: std::sync::Condvar::new(),
            events: events.clone(),
        });
        let serving = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = serving.clone();
                thread::spawn(move || serve(conn, &state));
            }
        });
        FakeApi {
            addr,
            state,
            events,
        }
    }

    /// A MODIFIED event for `pod`: the pod as listed from now on, and to
    /// every watch. As the API server does on every write, it gets a
    /// resourceVersion higher than any before (the one it has, if higher).
    pub fn modify(&self, mut pod: Value) {
        {
            let mut pods = self.state.pods.lock().unwrap();
            let latest = pods
                .iter()
                .map(rv)
                .chain(
                    self.state
                        .log
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|e| rv(&e["object"])),
                )
                .max()
                .unwrap_or(0)
                .max(5000);
            if rv(&pod) <= latest {
                pod["metadata"]["resourceVersion"] = json!((latest + 1).to_string());
            }
            pods.retain(|p| p["metadata"]["uid"] != pod["metadata"]["uid"]);
            pods.push(pod.clone());
        }
        self.state
            .log
            .lock()
            .unwrap()
            .push(json!({"type": "MODIFIED", "object": pod}));
        self.state.pushed.notify_all();
    }
}

fn respond(conn: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One keep-alive connection: requests until the client closes.
fn serve(conn: TcpStream, state: &State) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let ok = match (method, path) {
            ("GET", "/api/v1/pods") if query.contains("watch=true") => {
                let since = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("resourceVersion="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                watch(&mut conn, state, since);
                return;
            }
            ("GET", "/api/v1/pods") => {
                let pods = state.pods.lock().unwrap().clone();
                let latest = pods.iter().map(rv).max().unwrap_or(0).max(5000);
                respond(
                    &mut conn,
                    "200 OK",
                    &json!({
                        "apiVersion": "v1",
                        "kind": "PodList",
                        "metadata": {"resourceVersion": latest.to_string()},
                        "items": pods,
                    }),
                )
            }
            ("GET", p)
                if p == format!(
                    "/api/v1/namespaces/{}",
                    state.namespace["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                ) =>
            {
                respond(&mut conn, "200 OK", &state.namespace)
            }
            ("GET", p) if pod_at(state, p).is_some() => {
                let pod = pod_at(state, p).expect("just found");
                respond(&mut conn, "200 OK", &pod)
            }
            ("POST", p) if p.starts_with("/api/v1/namespaces/") && p.ends_with("/events") => {
                let ev: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                state.events.lock().unwrap().push(ev.clone());
                respond(&mut conn, "201 Created", &ev)
            }
            _ => respond(
                &mut conn,
                "404 Not Found",
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            ),
        };
        if ok.is_err() {
            return;
        }
    }
}

/// A watch: chunked newline-delimited events, as the API server streams
/// them — every logged event whose object is newer than `since`, then each
/// one pushed — until the client goes away.
fn watch(conn: &mut TcpStream, state: &State, since: u64) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut next = 0usize;
    loop {
        let batch: Vec<Value> = {
            let log = state.log.lock().unwrap();
            let (log, _) = state
                .pushed
                .wait_timeout_while(log, Duration::from_millis(200), |l| l.len() <= next)
                .unwrap();
            let batch = log[next..].to_vec();
            next = log.len();
            batch
        };
        for ev in batch.iter().filter(|e| rv(&e["object"]) > since) {
            let data = format!("{ev}\n");
            if write!(conn, "{:x}\r\n{data}\r\n", data.len()).is_err() {
                return;
            }
            let _ = conn.flush();
        }
        // Nothing to send: a write of nothing notices a client that is gone.
        if batch.is_empty() && conn.write_all(b"").is_err() {
            return;
        }
    }
}

pub fn kubeconfig(dir: &std::path::Path, api: SocketAddr) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        ),
    )
    .unwrap();
    path
}

pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The pod `GET /api/v1/namespaces/<ns>/pods/<name>` names, if served.
fn pod_at(state: &State, path: &str) -> Option<Value> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, name) = rest.split_once("/pods/")?;
    state
        .pods
        .lock()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name)
        .cloned()
}
