//! `switchyard up`: the whole stack on one machine. Starts N engines as child processes
//! of this binary (each on a free loopback port, waiting for its READY line), then the
//! router in this process over them, and prints the endpoint. Ctrl-C (or SIGTERM) stops
//! the router and every engine; engines also exit if this process dies (their stdin
//! closes).
//!
//! `--prefill-engines N --decode-engines M`: prefill/decode disaggregation. N + M engines,
//! each with a NixlConnector `--kv-transfer-config` ([`pd_engine_flags`]), labelled
//! `<model>-prefill` / `<model>-decode`, behind a router with `--routing-logic
//! disaggregated_prefill` ([`pd_router_flags`]).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Engines to start.
    #[arg(long, default_value_t = 2)]
    pub engines: usize,
    /// The router's port (the stack's one endpoint).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The engines' backend: `gguf` runs a real model on CPU, `sim` a latency model.
    #[arg(long, value_enum, default_value_t = engine::config::BackendKind::Gguf)]
    pub backend: engine::config::BackendKind,
    /// `gguf`: the GGUF file, or `smollm2` (SmolLM2-135M-Instruct, the default) or
    /// `gemma3-270m` (Gemma 3 270M Q4_K_M), fetched once on first use; `sim`: a name.
    #[arg(long)]
    pub model: Option<String>,
    /// The name clients ask for (default: the engines' own default for the model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Routing logic for the router.
    #[arg(long, value_enum, default_value_t = router::config::RoutingLogic::Roundrobin)]
    pub routing_logic: router::config::RoutingLogic,
    /// Session header for `--routing-logic session`.
    #[arg(long, default_value = "x-user-id")]
    pub session_key: String,
    /// Extra flags passed to every engine (e.g. `--engine-arg=--time-scale=0.1`).
    #[arg(long = "engine-arg", allow_hyphen_values = true)]
    pub engine_args: Vec<String>,
    /// Extra flags passed to the router (e.g. `--router-arg=--api-keys-file=keys.yaml`).
    /// Engines started with `$VLLM_API_KEY` set require it, and the router sends it.
    #[arg(long = "router-arg", allow_hyphen_values = true)]
    pub router_args: Vec<String>,
    /// Share KV across the engines: start a `switchyard cache-server` (holding at most this
    /// many bytes) and turn on every engine's offloading to it (LMCache's settings:
    /// `LMCACHE_REMOTE_URL`, host memory on), so a prompt computed on one engine is a
    /// remote hit on the others.
    #[arg(long, value_name = "MAX_BYTES", num_args = 0..=1, default_missing_value = "1073741824")]
    pub kv_cache_server: Option<u64>,
    /// Prefill/decode disaggregation: this many prefill engines (with
    /// `--decode-engines`; replaces `--engines`, and the routing logic is
    /// `disaggregated_prefill`).
    #[arg(long, requires = "decode_engines", conflicts_with = "kv_cache_server")]
    pub prefill_engines: Option<usize>,
    /// Prefill/decode disaggregation: this many decode engines.
    #[arg(long, requires = "prefill_engines")]
    pub decode_engines: Option<usize>,
}

/// The flags every engine of a disaggregated `up` gets: one place, to follow the engine
/// side (vLLM's NixlConnector; `kv_both` is valid for either role, and the KV side
/// channel listens on a port the OS chooses).
pub fn pd_engine_flags() -> [&'static str; 4] {
    [
        "--kv-transfer-config",
        r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#,
        "--kv-side-channel-port",
        "0",
    ]
}

/// The router flags of a disaggregated `up`: `prefill` prefill engines listed first in
/// `--static-backends`, then the decode engines.
pub fn pd_router_flags(served: &str, prefill: usize, decode: usize) -> Vec<String> {
    let (p, d) = (format!("{served}-prefill"), format!("{served}-decode"));
    let labels: Vec<&str> = std::iter::repeat_n(p.as_str(), prefill)
        .chain(std::iter::repeat_n(d.as_str(), decode))
        .collect();
    vec![
        "--routing-logic".into(),
        "disaggregated_prefill".into(),
        "--static-model-labels".into(),
        labels.join(","),
        "--prefill-model-labels".into(),
        p.clone(),
        "--decode-model-labels".into(),
        d.clone(),
    ]
}

/// A KV cache server for `--kv-cache-server`, as a child process: its `lm://` URL.
fn start_cache_server(exe: &std::path::Path, max_bytes: u64) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args([
            "cache-server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
        ])
        .args(["--max-bytes", &max_bytes.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the cache server")?;
    let stdout = child.stdout.take().context("cache server stdout")?;
    let mut lm = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(url) = line.strip_prefix("LM ") {
            lm = Some(url.trim().to_string());
        }
        if line.starts_with("READY ") {
            break;
        }
    }
    match lm {
        Some(url) => Ok((child, url)),
        None => {
            let _ = child.kill();
            bail!("the cache server did not start")
        }
    }
}

/// Child engines, killed on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Each engine's KV-cache events when the router follows them (`kvaware`): sockets on
/// free loopback ports, which the router learns from the engine's `GET /kv_events`.
const KV_EVENTS_CONFIG: &str = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:0","replay_endpoint":"tcp://127.0.0.1:0"}"#;

/// Every engine's offloading to a shared cache server.
const KV_TRANSFER_CONFIG: &str = r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#;

fn start_engine(
    exe: &std::path::Path,
    args: &UpArgs,
    model: Option<&str>,
    served: &str,
    cache_url: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<(Child, String)> {
    let mut cmd = Command::new(exe);
    let backend = args
        .backend
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    cmd.args([
        "engine",
        "--backend",
        &backend,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--exit-on-stdin-close",
    ])
    .args(["--served-model-name", served])
    .args(model.map(|m| ["--model", m]).into_iter().flatten())
    .args(
        (args.routing_logic == router::config::RoutingLogic::Kvaware)
            .then_some(["--kv-events-config", KV_EVENTS_CONFIG])
            .into_iter()
            .flatten(),
    )
    .args(
        cache_url
            .map(|_| ["--kv-transfer-config", KV_TRANSFER_CONFIG])
            .into_iter()
            .flatten(),
    )
    .envs(cache_url.map(|u| ("LMCACHE_REMOTE_URL", u)))
    .args(extra)
    .args(&args.engine_args)
    // Several engines on one machine: P/D side channels on free ports (each engine
    // advertises its own in `kv_transfer_params`), unless the arguments chose one.
    .args(
        ({
            let mut all = args
                .engine_args
                .iter()
                .map(String::as_str)
                .chain(extra.iter().copied());
            let nixl = all.clone().any(|a| a.contains("NixlConnector"));
            nixl && !all.any(|a| a.starts_with("--kv-side-channel-port"))
        })
        .then_some(["--kv-side-channel-port", "0"])
        .into_iter()
        .flatten(),
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting an engine")?;
    let stdout = child.stdout.take().context("engine stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("READY ") {
                let _ = tx.send(url.trim().to_string());
                break;
            }
        }
        // Keep draining so the engine never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            let _ = child.kill();
            bail!("an engine did not become ready")
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let pd = args.prefill_engines.zip(args.decode_engines);
    if let Some((p, d)) = pd {
        if p == 0 || d == 0 {
            bail!("--prefill-engines and --decode-engines must each be at least 1");
        }
    } else if args.engines == 0 {
        bail!("--engines must be at least 1");
    }
    let engines = pd.map_or(args.engines, |(p, d)| p + d);
    let exe = std::env::current_exe().context("locating the switchyard binary")?;
    let mut children = Children(Vec::new());
    let mut urls = Vec::new();
    // The model is fetched once here, not by each engine at the same time.
    let (model, served) = match (args.backend, &args.model) {
        (engine::config::BackendKind::Gguf, None) => (
            Some(
                engine::model_store::ensure_default_model()?
                    .display()
                    .to_string(),
            ),
            engine::model_store::DEFAULT_MODEL_NAME.to_string(),
        ),
        (engine::config::BackendKind::Gguf, Some(m))
            if engine::model_store::is_short_name(m) && !std::path::Path::new(m).is_file() =>
        {
            (
                Some(
                    engine::model_store::resolve(Some(std::path::Path::new(m)))?
                        .display()
                        .to_string(),
                ),
                m.clone(),
            )
        }
        (engine::config::BackendKind::Gguf, Some(m)) => (Some(m.clone()), m.clone()),
        (engine::config::BackendKind::Sim, m) => {
            (None, m.clone().unwrap_or_else(|| "switchyard-sim".into()))
        }
    };
    let served = args.served_model_name.clone().unwrap_or(served);
    let cache_url = match args.kv_cache_server {
        Some(max_bytes) => {
            let (child, url) = start_cache_server(&exe, max_bytes)?;
            children.0.push(child);
            eprintln!("switchyard up: KV cache server at {url}");
            Some(url)
        }
        None => None,
    };
    let extra: &[&str] = if pd.is_some() {
        &pd_engine_flags()
    } else {
        &[]
    };
    for _ in 0..engines {
        let (child, url) = start_engine(
            &exe,
            &args,
            model.as_deref(),
            &served,
            cache_url.as_deref(),
            extra,
        )?;
        children.0.push(child);
        urls.push(url);
    }
    // Built through the router's own flag parser, so every default stays the router's.
    let port = args.port.to_string();
    let logic = args
        .routing_logic
        .to_possible_value()
        .map(|v| v.get_name().to_string());
    let backends = urls.join(",");
    let mut flags = vec![
        "router",
        "--host",
        &args.host,
        "--port",
        &port,
        "--service-discovery",
        "static",
        "--static-backends",
        &backends,
        "--session-key",
        &args.session_key,
        "--engine-stats-interval",
        "5",
        "--health-check-interval",
        "2",
        "--health-failure-threshold",
        "2",
        "--health-success-threshold",
        "1",
        "--connect-timeout",
        "2",
        "--workers",
        "1",
    ];
    let pd_flags = pd.map(|(p, d)| pd_router_flags(&served, p, d));
    match &pd_flags {
        Some(f) => flags.extend(f.iter().map(String::as_str)),
        None => {
            if let Some(l) = &logic {
                flags.extend(["--routing-logic", l]);
            }
        }
    }
    // kvaware hashes prompts as the engines do: the real model's tokenizer and template
    // (the sim engines' own tokenizer is the router's default).
    if let (router::config::RoutingLogic::Kvaware, engine::config::BackendKind::Gguf, Some(m)) =
        (args.routing_logic, args.backend, &model)
    {
        flags.extend(["--tokenizer", m]);
    }
    flags.extend(args.router_args.iter().map(String::as_str));
    #[derive(Parser)]
    struct RouterFlags {
        #[command(flatten)]
        args: router::RouterArgs,
    }
    let router_args = RouterFlags::try_parse_from(flags)
        .context("router flags")?
        .args;
    let bound = router::bind(router_args).await?;
    let addr = bound.addr;
    eprintln!(
        "switchyard up: {} engine(s) serving `{}` behind http://{addr}/v1",
        urls.len(),
        served
    );
    for (i, u) in urls.iter().enumerate() {
        let role = match pd {
            Some((p, _)) if i < p => " (prefill)",
            Some(_) => " (decode)",
            None => "",
        };
        eprintln!("  engine {u}{role}");
    }
    println!("READY http://{addr}");
    bound.serve(httpx::shutdown_signal()).await?;
    drop(children);
    eprintln!("switchyard up: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disaggregated_up_labels_prefill_first_then_decode() {
        let f = pd_router_flags("m", 2, 1);
        let joined = f.join(" ");
        assert_eq!(
            joined,
            "--routing-logic disaggregated_prefill --static-model-labels m-prefill,m-prefill,m-decode \
             --prefill-model-labels m-prefill --decode-model-labels m-decode"
        );
        #[derive(Parser)]
        struct RouterFlags {
            #[command(flatten)]
            args: router::RouterArgs,
        }
        let mut argv = vec![
            "router".to_string(),
            "--static-backends".into(),
            "http://a:1,http://b:2,http://c:3".into(),
        ];
        argv.extend(f);
        let a = RouterFlags::try_parse_from(argv).expect("flags").args;
        let s = router::config::Settings::from_args(&a).expect("valid");
        assert_eq!(s.dynamic.backends[2].label.as_deref(), Some("m-decode"));
        assert!(pd_engine_flags()[1].contains("NixlConnector"));
    }
}
