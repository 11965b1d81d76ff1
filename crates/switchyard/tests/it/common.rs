//! Test harness: start `switchyard` subcommands as real processes, wait for readiness
//! (the `READY <url>` line on stdout, never a sleep), and kill them on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub struct Proc {
    pub child: Child,
    pub url: String,
}

impl Proc {
    /// Start `switchyard <args>` and wait until it prints `READY <url>`.
    pub fn start(args: &[&str]) -> Proc {
        Proc::start_with_env(args, &[])
    }

    /// `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn(args, env, None)
    }

    /// `start`, keeping every line the process writes on stderr (its log) in `lines`.
    pub fn start_logged(args: &[&str], lines: Arc<Mutex<Vec<String>>>) -> Proc {
        Proc::spawn(args, &[], Some(lines))
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], log: Option<Arc<Mutex<Vec<String>>>>) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("SWITCHYARD_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if log.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn switchyard");
        if let (Some(lines), Some(stderr)) = (log, child.stderr.take()) {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(url) = line.strip_prefix("READY ") {
                        let _ = tx.send(url.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("switchyard {args:?} did not become ready");
            }
        };
        Proc { child, url }
    }

    /// A sim engine on a free port with the given extra flags.
    pub fn engine(extra: &[&str]) -> Proc {
        let mut args = vec![
            "engine",
            "--backend",
            "sim",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ];
        args.extend_from_slice(extra);
        Proc::start(&args)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// `host:port`, as the router's `x-switchyard-engine` header names an engine.
    pub fn host_port(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// A router on a free loopback port over `backends` (base URLs), with extra flags.
    pub fn router(backends: &[&str], extra: &[&str]) -> Proc {
        let joined = backends.join(",");
        let mut args = vec![
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--static-backends",
            &joined,
        ];
        args.extend_from_slice(extra);
        Proc::start(&args)
    }
}

impl Proc {
    /// SIGTERM (a graceful shutdown) and wait up to 15 s for the exit; true if it exited
    /// successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url` and parse the JSON answer (panics with the step that failed).
pub async fn get_json(c: &reqwest::Client, url: &str) -> serde_json::Value {
    c.get(url)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

/// GET `url` and return the answer's text (a `/metrics` page; panics on failure).
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Read one sample's value from a Prometheus text page (`name{labels}` prefix match on
/// the series name and every given label pair).
pub fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            return None;
        }
        value.parse().ok()
    })
}

/// One HTTP/1.1 request as a loopback fake (engine, Kubernetes API, collector) read it.
pub struct RawRequest {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// Header names lower-cased, values trimmed, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    /// The first value of header `name` (lower case), or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Read one request (head, then a `Content-Length` body) off a fake's connection; `None`
/// when the connection closed or broke first.
pub async fn read_request<R>(r: &mut R) -> Option<RawRequest>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        match r.read_line(&mut h).await {
            Ok(0) | Err(_) => return None,
            Ok(_) if h == "\r\n" => break,
            Ok(_) => {}
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut req = RawRequest {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let len = req.header("content-length").parse().unwrap_or(0);
    req.body = vec![0; len];
    r.read_exact(&mut req.body).await.ok()?;
    Some(req)
}
