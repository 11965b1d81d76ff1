//! `--service-discovery k8s` end to end: a fake Kubernetes API server in the test (LIST
//! and WATCH of pods with resourceVersions, label selectors, bookmarks, watch timeouts,
//! 410 Gone as an ERROR event and as an HTTP 410) in front of real sim engines, each the
//! "pod" at its own loopback address (127.0.0.x) on the one `--k8s-port`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{client, get_json, metric, read_request, Proc};

const NS: &str = "test-ns";
const SELECTOR: &str = "app=engine,env=test";
const TOKEN: &str = "k8s-test-token";

/// One entry of the fake's history, in order.
#[derive(Clone)]
enum Entry {
    /// A watch event (`ADDED`/`MODIFIED`/`DELETED`) at `rv`.
    Event { rv: u64, event: Value },
    /// A `BOOKMARK` at `rv`, sent to the watches open at the time.
    Bookmark(u64),
    /// The watches open at the time get `ERROR` with a 410 Status and end.
    Expire,
    /// The watches open at the time end (as at their timeout).
    Close,
}

/// A request the fake saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    query: BTreeMap<String, String>,
    auth: String,
    /// The HTTP status it answered.
    status: u16,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "1" || w == "true")
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Current pods by name (each carrying its resourceVersion).
    pods: BTreeMap<String, Value>,
    log: Vec<Entry>,
    /// A watch from a resourceVersion below this is answered 410 Gone.
    oldest: u64,
    seen: Vec<Seen>,
}

/// The fake API server: honest to the API's list/watch semantics for what it serves.
struct FakeApi {
    state: Mutex<State>,
    /// Bumped on every change, so open watches wake.
    tick: tokio::sync::watch::Sender<u64>,
    url: String,
}

fn labels_match(pod: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|req| {
        let (k, v) = req.split_once('=').expect("equality selector");
        pod["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("hex");
            out.push(u8::from_str_radix(hex, 16).expect("hex"));
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf8")
}

fn bookmark(rv: u64) -> Value {
    json!({"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1",
        "metadata":{"resourceVersion": rv.to_string(),"creationTimestamp":null},
        "spec":{"containers":null},"status":{}}})
}

fn status_410(rv: u64) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
        "message":format!("too old resource version: {rv}"),"reason":"Expired","code":410})
}

impl FakeApi {
    async fn start() -> Arc<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (tick, _) = tokio::sync::watch::channel(0);
        let api = Arc::new(FakeApi {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            tick,
            url: format!("http://{}", listener.local_addr().expect("addr")),
        });
        let a = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let a = a.clone();
                tokio::spawn(async move {
                    let _ = a.serve(sock).await;
                });
            }
        });
        api
    }

    fn changed(&self, st: &State) {
        self.tick.send_replace(st.rv + st.log.len() as u64);
    }

    /// Create or replace a pod, with an event.
    fn put(&self, mut pod: Value) {
        let mut st = self.state.lock().expect("lock");
        st.rv += 1;
        let rv = st.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = pod["metadata"]["name"].as_str().expect("name").to_string();
        let kind = if st.pods.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.pods.insert(name, pod.clone());
        st.log.push(Entry::Event {
            rv,
            event: json!({"type": kind, "object": pod}),
        });
        self.changed(&st);
    }

    fn delete(&self, name: &str) {
        let mut st = self.state.lock().expect("lock");
        st.rv += 1;
        let rv = st.rv;
        let mut pod = st.pods.remove(name).expect("pod");
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push(Entry::Event {
            rv,
            event: json!({"type": "DELETED", "object": pod}),
        });
        self.changed(&st);
    }

    /// Change the store without an event (what a watcher misses while it is away).
    fn put_silently(&self, mut pod: Value) {
        let mut st = self.state.lock().expect("lock");
        st.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let name = pod["metadata"]["name"].as_str().expect("name").to_string();
        st.pods.insert(name, pod);
    }

    fn delete_silently(&self, name: &str) {
        let mut st = self.state.lock().expect("lock");
        st.rv += 1;
        st.pods.remove(name).expect("pod");
    }

    /// A bookmark to the open watches; its resourceVersion.
    fn bookmark(&self) -> u64 {
        let mut st = self.state.lock().expect("lock");
        st.rv += 1;
        let rv = st.rv;
        st.log.push(Entry::Bookmark(rv));
        self.changed(&st);
        rv
    }

    /// Forget the history up to now: open watches get an ERROR 410 event.
    fn expire(&self) {
        let mut st = self.state.lock().expect("lock");
        st.oldest = st.rv;
        st.log.push(Entry::Expire);
        self.changed(&st);
    }

    /// Forget the history up to now and end the open watches quietly: their resumption
    /// from an older resourceVersion is answered HTTP 410.
    fn compact_and_close(&self) {
        let mut st = self.state.lock().expect("lock");
        st.oldest = st.rv;
        st.log.push(Entry::Close);
        self.changed(&st);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("lock").seen.clone()
    }

    fn lists(&self) -> usize {
        self.seen().iter().filter(|s| !s.is_watch()).count()
    }

    async fn serve(&self, sock: TcpStream) -> std::io::Result<()> {
        let mut r = BufReader::new(sock);
        let mut line = String::new();
        r.read_line(&mut line).await?;
        let target = line.split(' ').nth(1).unwrap_or("/").to_string();
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("authorization") {
                    auth = v.trim().to_string();
                }
            }
        }
        let mut sock = r.into_inner();
        let (path, q) = target.split_once('?').unwrap_or((&target, ""));
        let query: BTreeMap<String, String> = q
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        let selector = query.get("labelSelector").cloned().unwrap_or_default();
        let mut seen = Seen {
            path: path.to_string(),
            query: query.clone(),
            auth: auth.clone(),
            status: 200,
        };
        if path != format!("/api/v1/namespaces/{NS}/pods") || auth != format!("Bearer {TOKEN}") {
            seen.status = if auth.is_empty() { 401 } else { 404 };
            self.state.lock().expect("lock").seen.push(seen.clone());
            let body = json!({"kind":"Status","code":seen.status}).to_string();
            return respond(&mut sock, seen.status, &body).await;
        }
        if !seen.is_watch() {
            let body = {
                let mut st = self.state.lock().expect("lock");
                st.seen.push(seen);
                let items: Vec<&Value> = st
                    .pods
                    .values()
                    .filter(|p| labels_match(p, &selector))
                    .collect();
                json!({"kind":"PodList","apiVersion":"v1",
                    "metadata":{"resourceVersion": st.rv.to_string()},"items":items})
                .to_string()
            };
            return respond(&mut sock, 200, &body).await;
        }
        // WATCH
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(3600));
        let mut rx = self.tick.subscribe();
        let gone = {
            let mut st = self.state.lock().expect("lock");
            let gone = from < st.oldest;
            if gone {
                seen.status = 410;
            }
            st.seen.push(seen);
            gone
        };
        if gone {
            return respond(&mut sock, 410, &status_410(from).to_string()).await;
        }
        let (replay, mut cursor) = {
            let st = self.state.lock().expect("lock");
            let replay: Vec<Value> = st
                .log
                .iter()
                .filter_map(|e| match e {
                    Entry::Event { rv, event } if *rv > from => Some(event.clone()),
                    // A server sends every watch bookmarks as it goes; a new one gets the
                    // latest at once.
                    Entry::Bookmark(rv) if *rv > from => Some(bookmark(*rv)),
                    _ => None,
                })
                .collect();
            (replay, st.log.len())
        };
        sock.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await?;
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        for ev in replay {
            if ev["type"] == "BOOKMARK" {
                if bookmarks {
                    chunk(&mut sock, &ev).await?;
                }
            } else if labels_match(&ev["object"], &selector) {
                chunk(&mut sock, &ev).await?;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let news: Vec<Entry> = {
                let st = self.state.lock().expect("lock");
                let n = st.log[cursor..].to_vec();
                cursor = st.log.len();
                n
            };
            for e in news {
                match e {
                    Entry::Event { event, .. } => {
                        if labels_match(&event["object"], &selector) {
                            chunk(&mut sock, &event).await?;
                        }
                    }
                    Entry::Bookmark(rv) => {
                        if bookmarks {
                            chunk(&mut sock, &bookmark(rv)).await?;
                        }
                    }
                    Entry::Expire => {
                        let e = json!({"type":"ERROR","object": status_410(from)});
                        chunk(&mut sock, &e).await?;
                        return end(&mut sock).await;
                    }
                    Entry::Close => return end(&mut sock).await,
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return end(&mut sock).await },
                _ = tokio::time::sleep_until(deadline) => return end(&mut sock).await,
            }
        }
    }
}

async fn respond(sock: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        410 => "Gone",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

async fn chunk(sock: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    sock.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .await?;
    sock.flush().await
}

async fn end(sock: &mut TcpStream) -> std::io::Result<()> {
    sock.write_all(b"0\r\n\r\n").await?;
    sock.shutdown().await
}

fn pod(name: &str, ip: Option<&str>, env: &str, ready: bool) -> Value {
    let cond = if ready { "True" } else { "False" };
    let mut status = json!({
        "phase": if ip.is_some() { "Running" } else { "Pending" },
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "ContainersReady", "status": cond},
            {"type": "Ready", "status": cond}
        ],
        "containerStatuses": [{"name": "vllm", "ready": ready, "restartCount": 0,
            "image": "switchyard", "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]
    });
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{ "ip": ip }]);
    }
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
            // `model` names the model spec, not the served name: discovery must not use it.
            "labels": {"app": "engine", "env": env, "model": "spec-name"}},
        "spec": {"containers": [{"name": "vllm", "image": "switchyard"}]},
        "status": status
    })
}

fn terminating(mut p: Value) -> Value {
    p["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    p
}

/// A stand-in engine that records the `Authorization` of its `/v1/models` calls.
async fn keyed_engine(addr: &str, auth_seen: Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind(addr).await.expect("bind keyed engine");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let auth_seen = auth_seen.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                let Some(req) = read_request(&mut r).await else {
                    return;
                };
                let mut sock = r.into_inner();
                let body = if req.method == "GET" && req.target == "/v1/models" {
                    auth_seen
                        .lock()
                        .expect("lock")
                        .push(req.header("authorization").to_string());
                    json!({"object":"list","data":[{"id":"keyed-model","object":"model","owned_by":"vllm"}]})
                        .to_string()
                } else {
                    "{}".to_string()
                };
                let _ = respond(&mut sock, 200, &body).await;
            });
        }
    });
}

async fn engine_ids(c: &reqwest::Client, r: &Proc) -> Vec<String> {
    let v: Value = get_json(c, &r.url("/engines")).await;
    let mut ids: Vec<String> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

async fn chat(c: &reqwest::Client, r: &Proc, model: &str) -> reqwest::Response {
    c.post(r.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages":[{"role":"user","content":"hi"}],"max_tokens":2}))
        .send()
        .await
        .expect("send")
}

fn served_by(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-switchyard-engine")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Poll until `f` holds (every 50 ms, at most `secs`).
async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Engines on 127.0.0.{2..} sharing one port (as pods share `--k8s-port`).
fn engines_on_one_port(specs: &[(&str, &[&str])]) -> (u16, Vec<Proc>) {
    // A port free on the first address; the others are distinct sockets.
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let p = port.to_string();
    let procs = specs
        .iter()
        .map(|(host, extra)| {
            let mut args = vec![
                "engine",
                "--backend",
                "sim",
                "--sim-preset",
                "zero",
                "--host",
                host,
                "--port",
                &p,
            ];
            args.extend_from_slice(extra);
            Proc::start(&args)
        })
        .collect();
    (port, procs)
}

// Multi-threaded: the fake API server answers while `Proc::start` blocks on READY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_set_follows_the_pods() {
    let (port, _engines) = engines_on_one_port(&[
        ("127.0.0.2", &["--sim-step-overhead-us", "20000"]),
        ("127.0.0.3", &[]),
        ("127.0.0.4", &[]),
        ("127.0.0.5", &["--served-model-name", "other"]),
    ]);
    let ip = |n: u8| format!("127.0.0.{n}");
    let id = |n: u8| format!("127.0.0.{n}:{port}");
    let keyed_auth = Arc::new(Mutex::new(Vec::new()));
    keyed_engine(&format!("127.0.0.9:{port}"), keyed_auth.clone()).await;

    let fake = FakeApi::start().await;
    fake.put(pod("a", Some(&ip(2)), "test", true));
    fake.put(pod("b", None, "test", false)); // Pending: no IP yet
    fake.put(pod("x", Some(&ip(4)), "prod", true)); // not selected
    fake.put(pod("d", Some(&ip(5)), "test", true));
    fake.put(pod("k", Some(&ip(9)), "test", true));
    let list_rv = fake.state.lock().expect("lock").rv;

    let dir = std::env::temp_dir().join(format!("switchyard-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let token_s = token.to_string_lossy().to_string();
    let port_s = port.to_string();
    let r = Proc::start_with_env(
        &[
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--service-discovery",
            "k8s",
            "--k8s-api-server",
            &fake.url,
            "--k8s-token-file",
            &token_s,
            "--k8s-namespace",
            NS,
            "--k8s-label-selector",
            SELECTOR,
            "--k8s-port",
            &port_s,
            "--k8s-watcher-timeout-seconds",
            "2",
            "--routing-logic",
            "roundrobin",
        ],
        &[("VLLM_API_KEY", "engine-key")],
    );
    let c = client();

    // READY came after the first LIST and the models of what it found: only the ready,
    // selected pods are engines, at once.
    assert_eq!(engine_ids(&c, &r).await, vec![id(2), id(5), id(9)]);
    let models: Value = get_json(&c, &r.url("/v1/models")).await;
    let mut names: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, vec!["keyed-model", "other", "switchyard-sim"]);
    assert_eq!(
        keyed_auth.lock().expect("lock").first().map(String::as_str),
        Some("Bearer engine-key"),
        "model discovery sends VLLM_API_KEY"
    );
    for _ in 0..6 {
        let resp = chat(&c, &r, "switchyard-sim").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(served_by(&resp), id(2), "only the ready pod serves");
    }
    let seen = fake.seen();
    assert!(!seen[0].is_watch(), "a LIST first");
    assert_eq!(seen[0].path, format!("/api/v1/namespaces/{NS}/pods"));
    assert_eq!(seen[0].status, 200);
    assert_eq!(
        seen[0].query.get("labelSelector").map(String::as_str),
        Some(SELECTOR)
    );
    assert_eq!(seen[0].auth, format!("Bearer {TOKEN}"));
    let w = seen.iter().find(|s| s.is_watch()).expect("a watch");
    assert_eq!(
        w.query.get("resourceVersion"),
        Some(&list_rv.to_string()),
        "the watch starts at the list's version"
    );
    assert_eq!(
        w.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
    assert_eq!(w.query.get("timeoutSeconds").map(String::as_str), Some("2"));
    assert_eq!(
        w.query.get("labelSelector").map(String::as_str),
        Some(SELECTOR)
    );
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let server = |n: u8| format!("http://{}", id(n));
    assert_eq!(
        metric(&page, "vllm:healthy_pods_total", &[("server", &server(2))]),
        Some(1.0)
    );
    assert_eq!(
        metric(&page, "vllm:healthy_pods_total", &[("server", &server(3))]),
        None
    );

    // b turns ready: it joins.
    fake.put(pod("b", Some(&ip(3)), "test", true));
    eventually(10, "b joins and serves", || async {
        let mut hit = std::collections::HashSet::new();
        for _ in 0..4 {
            hit.insert(served_by(&chat(&c, &r, "switchyard-sim").await));
        }
        hit.contains(&id(3))
    })
    .await;

    // A bookmark moves the resourceVersion on: after the watch times out (2 s) it resumes
    // from the bookmark's version, which no event carried.
    let bookmark_rv = fake.bookmark().to_string();
    eventually(10, "a watch resumes from the bookmark", || async {
        fake.seen()
            .iter()
            .any(|s| s.is_watch() && s.query.get("resourceVersion") == Some(&bookmark_rv))
    })
    .await;

    // A stream in flight on a when a turns terminating: the pod leaves the set at once,
    // and the stream still finishes.
    let mut stream = c
        .post(r.url(&format!("/v1/completions?id={}", id(2))))
        .json(&json!({"model":"switchyard-sim","prompt":"x","max_tokens":60,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send");
    assert_eq!(served_by(&stream), id(2));
    let first = stream.chunk().await.expect("chunk").expect("first chunk");
    fake.put(terminating(pod("a", Some(&ip(2)), "test", true)));
    eventually(10, "a leaves", || async {
        !engine_ids(&c, &r).await.contains(&id(2))
    })
    .await;
    for _ in 0..6 {
        assert_eq!(served_by(&chat(&c, &r, "switchyard-sim").await), id(3));
    }
    let mut body = String::from_utf8_lossy(&first).to_string();
    while let Some(b) = stream.chunk().await.expect("chunk") {
        body.push_str(&String::from_utf8_lossy(&b));
    }
    assert_eq!(
        body.matches("data: {").count(),
        60,
        "the stream was cut: {body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"));
    fake.delete("a");

    // Missed events, then an ERROR 410 on the watch: the router lists again and the set
    // becomes the list's, without dropping b (its statistics survive).
    let latency_count = |page: &str| {
        metric(
            page,
            "vllm:request_latency_seconds_count",
            &[("server", &server(3))],
        )
    };
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let b_before = latency_count(&page).expect("b's latency count");
    assert!(b_before >= 6.0, "{b_before}");
    let lists = fake.lists();
    fake.put_silently(pod("c", Some(&ip(4)), "test", true));
    fake.delete_silently("d");
    fake.expire();
    eventually(10, "relisted after ERROR 410", || async {
        engine_ids(&c, &r).await == vec![id(3), id(4), id(9)]
    })
    .await;
    assert_eq!(fake.lists(), lists + 1, "one LIST after the 410");
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        latency_count(&page).is_some_and(|n| n >= b_before),
        "b was kept across the relist, not recreated"
    );
    // d's model was seen: with no engine left it is a 503 with Retry-After, not a 404.
    let resp = chat(&c, &r, "other").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let mut hit = std::collections::HashSet::new();
    for _ in 0..6 {
        hit.insert(served_by(&chat(&c, &r, "switchyard-sim").await));
    }
    assert_eq!(
        hit,
        [id(3), id(4)].into_iter().collect(),
        "c serves after the relist"
    );

    // Missed events, then the watch ends and its resumption is too old: HTTP 410, list.
    let lists = fake.lists();
    fake.put_silently(pod("b", Some(&ip(3)), "test", false));
    fake.compact_and_close();
    eventually(10, "relisted after HTTP 410", || async {
        engine_ids(&c, &r).await == vec![id(4), id(9)]
    })
    .await;
    assert!(
        fake.seen().iter().any(|s| s.is_watch() && s.status == 410),
        "a watch was answered 410"
    );
    assert_eq!(fake.lists(), lists + 1);

    // The last pod of the model goes: 503 (scale from zero), never 404.
    fake.delete("c");
    eventually(10, "c leaves", || async {
        engine_ids(&c, &r).await == vec![id(9)]
    })
    .await;
    let resp = chat(&c, &r, "switchyard-sim").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    assert_eq!(chat(&c, &r, "never-served").await.status(), 404);
    // And it comes back with its pod.
    fake.put(pod("c", Some(&ip(4)), "test", true));
    eventually(10, "c back", || async {
        chat(&c, &r, "switchyard-sim").await.status() == 200
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reloads_keep_or_restart_the_watch() {
    let (port, _engines) = engines_on_one_port(&[("127.0.0.6", &[]), ("127.0.0.7", &[])]);
    let id = |n: u8| format!("127.0.0.{n}:{port}");
    let fake = FakeApi::start().await;
    fake.put(pod("t", Some("127.0.0.6"), "test", true));
    fake.put(pod("p", Some("127.0.0.7"), "prod", true));
    let dir = std::env::temp_dir().join(format!("switchyard-k8s-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let cfg = dir.join("router.json");
    let write = |logic: &str, selector: &str| {
        let v = json!({"service_discovery": "k8s", "k8s_namespace": NS,
            "k8s_label_selector": selector, "k8s_port": port, "routing_logic": logic});
        std::fs::write(&cfg, v.to_string()).expect("write");
    };
    write("roundrobin", SELECTOR);
    let (token_s, cfg_s) = (
        token.to_string_lossy().to_string(),
        cfg.to_string_lossy().to_string(),
    );
    let r = Proc::start(&[
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--k8s-api-server",
        &fake.url,
        "--k8s-token-file",
        &token_s,
        "--dynamic-config-json",
        &cfg_s,
        "--dynamic-config-interval",
        "0.1",
    ]);
    let c = client();
    assert_eq!(engine_ids(&c, &r).await, vec![id(6)]);
    let lists = fake.lists();

    // A routing change leaves the engine set and the watch alone.
    write("prefixaware", SELECTOR);
    eventually(10, "the routing change is applied", || async {
        let page = c
            .get(r.url("/metrics"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        page.contains("vllm:router_prefix_decisions_total")
    })
    .await;
    assert_eq!(engine_ids(&c, &r).await, vec![id(6)]);
    assert_eq!(fake.lists(), lists, "no new LIST");
    let resp = chat(&c, &r, "switchyard-sim").await;
    assert_eq!((resp.status().as_u16(), served_by(&resp)), (200, id(6)));

    // A selector change restarts the watch: a new LIST replaces the set.
    write("prefixaware", "app=engine,env=prod");
    eventually(10, "the new selector's pods", || async {
        engine_ids(&c, &r).await == vec![id(7)]
    })
    .await;
    assert!(fake.lists() > lists);
    eventually(10, "the new engine serves", || async {
        let resp = chat(&c, &r, "switchyard-sim").await;
        resp.status() == 200 && served_by(&resp) == id(7)
    })
    .await;
    // And the restarted watch follows events.
    fake.put(pod("p2", Some("127.0.0.6"), "prod", true));
    eventually(10, "an event on the new watch", || async {
        engine_ids(&c, &r).await == vec![id(6), id(7)]
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Out of a cluster, a kubeconfig context gives the API server and the token (a
/// `tokenFile` relative to the kubeconfig): the router finds the pods through it, and
/// the fake API server refuses any other token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_context_reaches_the_api_server() {
    let (port, _engines) = engines_on_one_port(&[("127.0.0.2", &[])]);
    let fake = FakeApi::start().await;
    fake.put(pod("a", Some("127.0.0.2"), "test", true));
    let dir = std::env::temp_dir().join(format!("switchyard-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("creds")).expect("dir");
    std::fs::write(dir.join("creds").join("token"), TOKEN).expect("token");
    let cfg = dir.join("config");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: other\ncontexts:\n\
             - name: other\n  context: {{cluster: nowhere, user: nobody}}\n\
             - name: lab\n  context: {{cluster: lab, user: dev}}\n\
             clusters:\n- name: lab\n  cluster: {{server: '{}'}}\n\
             users:\n- name: dev\n  user: {{tokenFile: creds/token}}\n",
            fake.url
        ),
    )
    .expect("kubeconfig");
    let (cfg_s, port_s) = (cfg.to_string_lossy().to_string(), port.to_string());
    let r = Proc::start(&[
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--service-discovery",
        "k8s",
        "--k8s-kubeconfig",
        &cfg_s,
        "--k8s-context",
        "lab",
        "--k8s-namespace",
        NS,
        "--k8s-label-selector",
        SELECTOR,
        "--k8s-port",
        &port_s,
    ]);
    let c = client();
    assert_eq!(engine_ids(&c, &r).await, vec![format!("127.0.0.2:{port}")]);
    let seen = fake.seen();
    assert_eq!(seen[0].auth, format!("Bearer {TOKEN}"));
    assert_eq!(seen[0].status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_prefill_sorts_pods_by_their_model_label() {
    let (port, _engines) = engines_on_one_port(&[
        ("127.0.0.12", &["--served-model-name", "m"]),
        ("127.0.0.13", &["--served-model-name", "m"]),
    ]);
    let fake = FakeApi::start().await;
    let labelled = |name: &str, ip: &str, label: &str| {
        let mut p = pod(name, Some(ip), "test", true);
        p["metadata"]["labels"]["model"] = json!(label);
        p
    };
    fake.put(labelled("pre", "127.0.0.12", "m-prefill"));
    fake.put(labelled("dec", "127.0.0.13", "m-decode"));
    let dir = std::env::temp_dir().join(format!("switchyard-k8s-pd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let (token_s, port_s) = (token.to_string_lossy().to_string(), port.to_string());
    let r = Proc::start(&[
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--service-discovery",
        "k8s",
        "--k8s-api-server",
        &fake.url,
        "--k8s-token-file",
        &token_s,
        "--k8s-namespace",
        NS,
        "--k8s-label-selector",
        SELECTOR,
        "--k8s-port",
        &port_s,
        "--routing-logic",
        "disaggregated_prefill",
        "--prefill-model-labels",
        "m-prefill",
        "--decode-model-labels",
        "m-decode",
    ]);
    let c = client();
    let (pre, dec) = (format!("127.0.0.12:{port}"), format!("127.0.0.13:{port}"));
    // Not a completion: the decode pod, plainly.
    let t = c
        .post(r.url("/tokenize"))
        .json(&json!({"model":"m","prompt":"hi"}))
        .send()
        .await
        .expect("send");
    assert_eq!(t.status(), 200);
    assert_eq!(served_by(&t), dec);
    // A completion goes to the prefill pod first, then the decode pod answers (these
    // engines share no KV: the prefill's answer has no kv_transfer_params, so the
    // original request goes on, as with LMCache-based engines).
    let resp = chat(&c, &r, "m").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(served_by(&resp), dec);
    assert_eq!(
        resp.headers()["x-switchyard-prefill-engine"]
            .to_str()
            .expect("h"),
        pre
    );
}
