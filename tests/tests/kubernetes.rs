//! `divert daemon --kubernetes` against a fake API server that serves
//! recorded list/watch JSON (`tests/testdata/kubernetes/`) over real HTTP to
//! the real kube-rs client: a meshed pod is registered from its
//! annotations over the mesh defaults, an annotation change is applied to
//! the running pod, and a bad annotation posts an Event and changes
//! nothing.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use divert::{ebpf::pinned, policy::Action};
use divert_tests::{cases::expected, command_in, node::Setup, require_root, Daemon};
use serde_json::{json, Value};

const POD_UID: &str = "7d5c3b1e-4a2f-4e8b-9c61-2f0d6e1a9b33";

fn testdata(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/kubernetes")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// An HTTP/1.1 server with the few API paths the pod watch uses: list and
/// watch pods, get a namespace, create events. Watch events are pushed by
/// the test; created events are recorded.
struct FakeApi {
    addr: SocketAddr,
    watch: mpsc::Sender<Value>,
    events: Arc<Mutex<Vec<Value>>>,
}

struct State {
    pods: Mutex<Vec<Value>>,
    namespace: Value,
    watch: Mutex<mpsc::Receiver<Value>>,
    events: Arc<Mutex<Vec<Value>>>,
}

impl FakeApi {
    fn start(pods: Vec<Value>, namespace: Value) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            pods: Mutex::new(pods),
            namespace,
            watch: Mutex::new(rx),
            events: events.clone(),
        });
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = state.clone();
                thread::spawn(move || serve(conn, &state));
            }
        });
        FakeApi {
            addr,
            watch: tx,
            events,
        }
    }

    /// Push a MODIFIED event for `pod` into the open watch.
    fn modify(&self, pod: Value) {
        self.watch
            .send(json!({"type": "MODIFIED", "object": pod}))
            .unwrap();
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
                watch(&mut conn, state);
                return;
            }
            ("GET", "/api/v1/pods") => respond(
                &mut conn,
                "200 OK",
                &json!({
                    "apiVersion": "v1",
                    "kind": "PodList",
                    "metadata": {"resourceVersion": "5000"},
                    "items": *state.pods.lock().unwrap(),
                }),
            ),
            ("GET", "/api/v1/namespaces/shop") => respond(&mut conn, "200 OK", &state.namespace),
            ("POST", "/api/v1/namespaces/shop/events") => {
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
/// them, until the client goes away.
fn watch(conn: &mut TcpStream, state: &State) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    loop {
        let ev = state
            .watch
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_millis(200));
        let Ok(ev) = ev else {
            // Nothing to send: make sure the client is still there.
            if conn.write_all(b"").is_err() {
                return;
            }
            continue;
        };
        if let Some(obj) = ev.get("object") {
            let mut pods = state.pods.lock().unwrap();
            pods.retain(|p| p["metadata"]["uid"] != obj["metadata"]["uid"]);
            pods.push(obj.clone());
        }
        let data = format!("{ev}\n");
        if write!(conn, "{:x}\r\n{data}\r\n", data.len()).is_err() {
            return;
        }
        let _ = conn.flush();
    }
}

fn kubeconfig(dir: &std::path::Path, api: SocketAddr) -> PathBuf {
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

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pods_are_registered_from_their_annotations_live() {
    require_root!();
    let s = Setup::start();
    // The pod: a process in the client namespace, in a cgroup named the
    // way kubelet names the pod's (cgroupfs driver).
    let kubepods = s.lab.root.child("kubepods").unwrap();
    let besteffort = kubepods.child("besteffort").unwrap();
    let pod_cg = besteffort.child(&format!("pod{POD_UID}")).unwrap();
    let (mut pause, _keep) = command_in(s.lab.in_client(&pod_cg, None), "sleep").unwrap();
    pause.arg("600");
    let _pause = Daemon::spawn("pause", pause).unwrap();

    let pod = testdata("pod-cart-1.json");
    let api = FakeApi::start(vec![pod.clone()], testdata("namespace-shop.json"));
    let config = kubeconfig(s.bpffs.dir.path(), api.addr);
    let mesh = s.bpffs.dir.path().join("mesh.json");
    std::fs::write(
        &mesh,
        r#"{"excludeOutboundPorts": "5432", "proxyUID": "1337"}"#,
    )
    .unwrap();
    let _daemon = s.daemon_env(
        &["--kubernetes", "--mesh-config", mesh.to_str().unwrap()],
        &[
            ("KUBECONFIG", config.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
        ],
    );

    let (cookie, _) = s.lab.client_identity().unwrap();
    let registered = || {
        pinned::open_maps(&s.bpffs.path())
            .unwrap()
            .registered_cookies()
            .unwrap()
            .contains(&cookie)
    };
    wait_until("the pod registered", registered);
    let peer = s.lab.v4(2);
    let dial = |port: u16| {
        let dst = SocketAddr::new(peer, port);
        (dst, s.lab.dial(dst, 1000, 1000, false).unwrap())
    };
    let redirected = |port| {
        let (dst, got) = dial(port);
        got == expected(Action::Redirect(15001), dst, false)
    };
    // The annotation excludes 8080; present, it replaces the mesh
    // default's 5432, which is therefore redirected.
    assert!(redirected(80));
    assert!(!redirected(8080));
    assert!(redirected(5432));
    let (_, metrics) = s.http_get("/metrics");
    assert!(
        metrics.contains(r#"namespace="shop",pod="cart-1""#),
        "{metrics}"
    );
    // The watch recorded the pod and itself as the registrar in the pinned
    // maps: `divert maps --pod` finds it, and says so.
    let out = std::process::Command::new(divert_tests::divert_bin())
        .args(["maps", "--pod", "shop/cart-1", "-o", "json", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("divert maps: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(rows[0]["netns_cookie"], cookie, "{rows:#}");
    assert_eq!(rows[0]["source"], "kubernetes", "{rows:#}");
    assert_eq!(rows[0]["exclude_ports"], json!([8080]), "{rows:#}");

    // Live: the annotation now excludes 80 instead.
    let mut changed = pod.clone();
    changed["metadata"]["resourceVersion"] = json!("5001");
    changed["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
        json!("80");
    api.modify(changed.clone());
    wait_until("the annotation change applied", || !redirected(80));
    assert!(redirected(8080));

    // A bad annotation: an Event, a log line, and the pod keeps its policy.
    let mut bad = changed.clone();
    bad["metadata"]["resourceVersion"] = json!("5002");
    bad["metadata"]["annotations"]["traffic.sidecar.istio.io/includeOutboundIPRanges"] =
        json!("10.0.0.0/33");
    api.modify(bad);
    wait_until("the Event posted", || {
        !api.events.lock().unwrap().is_empty()
    });
    let ev = api.events.lock().unwrap()[0].clone();
    assert_eq!(ev["reason"], "DivertBadAnnotation", "{ev}");
    assert_eq!(ev["type"], "Warning", "{ev}");
    assert_eq!(ev["involvedObject"]["uid"], POD_UID, "{ev}");
    let msg = ev["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("traffic.sidecar.istio.io/includeOutboundIPRanges")
            && msg.contains("10.0.0.0/33"),
        "{msg}"
    );
    assert!(!redirected(80), "the bad annotation changed the policy");
    assert!(redirected(8080), "the bad annotation changed the policy");
}
