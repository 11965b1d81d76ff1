//! LoRA adapters over the engine's HTTP API (issue 18), against real processes: adapters
//! served as models (`--lora-modules`, runtime load and unload behind
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), vLLM's answers and error bodies, `/v1/models`,
//! `vllm:lora_requests_info`. A sim engine where the weights do not matter, one real
//! SmolLM2 engine where they do. Adapters are written by `scripts/make-lora-adapter.py`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::common::{client, get_json, Proc};

/// A fresh temp folder for this test's adapters (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("sy-it-lora-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("utf-8 path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write an adapter with the repository's script (`extra`: more of its flags).
fn make_adapter(out: &str, seed: u32, rank: u32, extra: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-lora-adapter.py");
    let status = Command::new("python3")
        .arg(&script)
        .args(["--out", out, "--seed", &seed.to_string()])
        .args(["--rank", &rank.to_string()])
        .args(extra)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "{} failed", script.display());
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, String) {
    let r = c.post(url).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// An OpenAI-format error body: its type and message.
fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (
        v["error"]["type"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

async fn complete(c: &reqwest::Client, e: &Proc, model: &str) -> (u16, Value) {
    let (s, b) = post(
        c,
        &e.url("/v1/completions"),
        &json!({"model": model, "prompt": "The capital of France is", "max_tokens": 12,
                "temperature": 0}),
    )
    .await;
    (s, serde_json::from_str(&b).unwrap_or(Value::Null))
}

async fn model_ids(c: &reqwest::Client, e: &Proc) -> Vec<Value> {
    get_json(c, &e.url("/v1/models")).await["data"]
        .as_array()
        .expect("data")
        .clone()
}

const RUNTIME: (&str, &str) = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true");

/// Adapters on a sim engine: served by name from the start and after a runtime load,
/// listed with their parent, unloaded; every refusal is vLLM's status and error type, and
/// none stops the engine serving.
#[tokio::test]
async fn adapters_load_serve_and_unload_with_vllms_answers() {
    let d = TempDir::new("sim");
    let small = ["--layers", "2"];
    make_adapter(&d.path("sql"), 1, 8, &small);
    make_adapter(&d.path("chat"), 2, 4, &small);
    make_adapter(&d.path("big"), 3, 32, &small);
    // A folder with a config that is not a LoRA adapter's.
    std::fs::create_dir_all(d.path("junk")).expect("junk");
    std::fs::write(
        d.0.join("junk/adapter_config.json"),
        r#"{"peft_type": "PROMPT_TUNING", "r": 8, "lora_alpha": 8}"#,
    )
    .expect("write");
    let sql_arg = format!("sql={}", d.path("sql"));
    let e = Proc::start_with_env(
        &[
            "engine",
            "--backend",
            "sim",
            "--sim-preset",
            "zero",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--served-model-name",
            "base",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-lora-rank",
            "16",
            "--lora-modules",
            &sql_arg,
        ],
        &[RUNTIME],
    );
    let c = client();

    // Listed after the base model, with vLLM's parent and root.
    let models = model_ids(&c, &e).await;
    assert_eq!(models.len(), 2, "{models:?}");
    assert_eq!(models[0]["id"], "base");
    assert_eq!(models[1]["id"], "sql");
    assert_eq!(models[1]["parent"], "base");
    assert_eq!(models[1]["root"], d.path("sql").as_str());

    // Served by name; the response names the adapter.
    let (s, r) = complete(&c, &e, "sql").await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["model"], "sql");
    let (s, r) = complete(&c, &e, "base").await;
    assert_eq!((s, r["model"].as_str()), (200, Some("base")));
    // Unknown model: vLLM's 404.
    let (s, r) = complete(&c, &e, "nope").await;
    assert_eq!(s, 404, "{r}");
    assert_eq!(r["error"]["type"], "NotFoundError");

    let load = e.url("/v1/load_lora_adapter");
    let unload = e.url("/v1/unload_lora_adapter");
    // Runtime load: vLLM's plain-text success line, then served and listed.
    let (s, b) = post(
        &c,
        &load,
        &json!({"lora_name": "chat", "lora_path": d.path("chat")}),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (200, "Success: LoRA adapter 'chat' added successfully.")
    );
    let (s, r) = complete(&c, &e, "chat").await;
    assert_eq!((s, r["model"].as_str()), (200, Some("chat")), "{r}");
    let ids: Vec<Value> = model_ids(&c, &e)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("base"), json!("sql"), json!("chat")]);

    // Refusals, each with vLLM's status and type.
    let cases: [(&str, Value, u16, &str, &str); 6] = [
        (
            "loaded twice",
            json!({"lora_name": "chat", "lora_path": d.path("chat")}),
            400,
            "InvalidUserInput",
            "The lora adapter 'chat' has already been loaded.",
        ),
        (
            "no path",
            json!({"lora_name": "x"}),
            400,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.",
        ),
        (
            "nothing at the path",
            json!({"lora_name": "ghost", "lora_path": d.path("missing")}),
            404,
            "NotFoundError",
            "No adapter found for",
        ),
        (
            "not an adapter",
            json!({"lora_name": "junk", "lora_path": d.path("junk")}),
            400,
            "BadRequestError",
            "is not LORA",
        ),
        (
            "rank above --max-lora-rank",
            json!({"lora_name": "big", "lora_path": d.path("big")}),
            400,
            "BadRequestError",
            "LoRA rank 32 is greater than max_lora_rank 16.",
        ),
        (
            "the base model's name",
            json!({"lora_name": "base", "lora_path": d.path("chat")}),
            400,
            "InvalidUserInput",
            "has already been loaded",
        ),
    ];
    for (what, body, status, kind, message) in cases {
        let (s, b) = post(&c, &load, &body).await;
        assert_eq!(s, status, "{what}: {b}");
        let (k, m) = error_of(&b);
        assert_eq!(k, kind, "{what}: {b}");
        assert!(m.contains(message), "{what}: {m:?} lacks {message:?}");
    }
    let (_, b) = post(
        &c,
        &load,
        &json!({"lora_name": "ghost", "lora_path": d.path("missing")}),
    )
    .await;
    assert!(
        error_of(&b)
            .1
            .starts_with("Loading lora ghost failed: No adapter found for "),
        "vLLM's wording: {b}"
    );
    // None of them was registered, and the engine still serves.
    let ids: Vec<Value> = model_ids(&c, &e)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("base"), json!("sql"), json!("chat")]);
    for m in ["base", "sql", "chat"] {
        assert_eq!(complete(&c, &e, m).await.0, 200, "{m} after the refusals");
    }

    // A LoRA request cannot take part in P/D disaggregation: a clear 400.
    let (s, b) = post(
        &c,
        &e.url("/v1/completions"),
        &json!({"model": "sql", "prompt": "hi", "max_tokens": 2,
                "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert!(error_of(&b).1.contains("not supported"), "{b}");

    // Unload: vLLM's line; then the name is unknown, and unloading again is a 404.
    let (s, b) = post(&c, &unload, &json!({"lora_name": "chat"})).await;
    assert_eq!(
        (s, b.as_str()),
        (200, "Success: LoRA adapter 'chat' removed successfully.")
    );
    assert_eq!(complete(&c, &e, "chat").await.0, 404);
    let (s, b) = post(&c, &unload, &json!({"lora_name": "chat"})).await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(
        error_of(&b),
        (
            "NotFoundError".to_string(),
            "The lora adapter 'chat' cannot be found.".to_string()
        )
    );
    let (s, b) = post(&c, &unload, &json!({})).await;
    assert_eq!(
        (s, error_of(&b).0.as_str()),
        (400, "InvalidUserInput"),
        "{b}"
    );

    // vLLM's info gauge, with --max-loras as its label.
    let page = c
        .get(e.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let line = page
        .lines()
        .find(|l| l.starts_with("vllm:lora_requests_info{"))
        .unwrap_or_else(|| panic!("no vllm:lora_requests_info in\n{page}"));
    for label in [
        "max_lora=\"2\"",
        "running_lora_adapters=\"\"",
        "waiting_lora_adapters=\"\"",
    ] {
        assert!(line.contains(label), "{line} lacks {label}");
    }
}

/// Without runtime updating the load and unload routes do not exist (404, as vLLM), and
/// adapters from `--lora-modules` are still served; bad LoRA flags stop the start.
#[tokio::test]
async fn runtime_routes_need_runtime_updating_and_bad_flags_stop_the_start() {
    let d = TempDir::new("static");
    make_adapter(&d.path("sql"), 1, 8, &["--layers", "2"]);
    let sql_arg = format!("sql={}", d.path("sql"));
    let base = [
        "engine",
        "--backend",
        "sim",
        "--sim-preset",
        "zero",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--served-model-name",
        "base",
    ];
    let mut args = base.to_vec();
    args.extend(["--enable-lora", "--lora-modules", &sql_arg]);
    let e = Proc::start_with_env(&args, &[("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")]);
    let c = client();
    for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
        let (s, b) = post(
            &c,
            &e.url(path),
            &json!({"lora_name": "x", "lora_path": d.path("sql")}),
        )
        .await;
        assert_eq!(s, 404, "{path}: {b}");
    }
    let (s, r) = complete(&c, &e, "sql").await;
    assert_eq!((s, r["model"].as_str()), (200, Some("sql")), "{r}");
    drop(e);

    // Refused at start, with a message naming the flag.
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let missing = format!("sql={}", d.path("missing"));
    let bad: [(&[&str], &str); 4] = [
        (&["--lora-modules", &sql_arg], "--enable-lora"),
        (
            &["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"],
            "--max-cpu-loras",
        ),
        (&["--enable-lora", "--max-lora-rank", "0"], "positive"),
        (
            &["--enable-lora", "--lora-modules", &missing],
            "No adapter found",
        ),
    ];
    for (extra, says) in bad {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = Command::new(bin)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} started");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}

/// On the real model (SmolLM2): a runtime-loaded adapter changes greedy output and gives
/// the same output every time; the base model's is unchanged beside it; an adapter whose
/// shapes do not fit the model, or whose rank is too high, is a 400 and the engine keeps
/// serving.
#[tokio::test]
async fn a_real_engine_applies_an_adapter_by_name() {
    let d = TempDir::new("real");
    make_adapter(
        &d.path("one"),
        7,
        8,
        &["--targets", "all", "--scale", "1.0"],
    );
    make_adapter(&d.path("narrow"), 8, 8, &["--hidden", "64"]);
    make_adapter(&d.path("big"), 9, 32, &[]);
    let e = Proc::start_with_env(
        &[
            "engine",
            "--model",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-model-len",
            "512",
            "--enable-lora",
            "--max-lora-rank",
            "16",
        ],
        &[RUNTIME],
    );
    let c = client();
    let base_name = model_ids(&c, &e).await[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let text = |r: &Value| r["choices"][0]["text"].as_str().map(str::to_string);
    let (s, r) = complete(&c, &e, &base_name).await;
    assert_eq!(s, 200, "{r}");
    let base_text = text(&r);

    let load = e.url("/v1/load_lora_adapter");
    let (s, b) = post(
        &c,
        &load,
        &json!({"lora_name": "one", "lora_path": d.path("one")}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, r) = complete(&c, &e, "one").await;
    assert_eq!(s, 200, "{r}");
    let adapter_text = text(&r);
    assert_ne!(adapter_text, base_text, "the adapter changes greedy output");
    assert_eq!(text(&complete(&c, &e, "one").await.1), adapter_text);
    assert_eq!(text(&complete(&c, &e, &base_name).await.1), base_text);

    for (name, says) in [
        ("narrow", "the model needs in 576"),
        ("big", "greater than max_lora_rank 16"),
    ] {
        let (s, b) = post(
            &c,
            &load,
            &json!({"lora_name": name, "lora_path": d.path(name)}),
        )
        .await;
        assert_eq!(s, 400, "{name}: {b}");
        let (kind, message) = error_of(&b);
        assert_eq!(kind, "BadRequestError", "{b}");
        assert!(message.contains(says), "{name}: {message}");
    }
    assert_eq!(text(&complete(&c, &e, "one").await.1), adapter_text);
    assert_eq!(model_ids(&c, &e).await.len(), 2);
}

/// A sim engine with LoRA on and runtime updating, serving `base` (and `extra` flags).
fn lora_engine(extra: &[&str]) -> Proc {
    let mut args = vec![
        "engine",
        "--backend",
        "sim",
        "--sim-preset",
        "zero",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--served-model-name",
        "base",
        "--enable-lora",
        "--max-loras",
        "2",
    ];
    args.extend_from_slice(extra);
    Proc::start_with_env(&args, &[RUNTIME])
}

/// Which engine served a completion for `model` through the router (its status and
/// `x-switchyard-engine`).
async fn routed(c: &reqwest::Client, router: &Proc, model: &str) -> (u16, String) {
    let r = c
        .post(router.url("/v1/completions"))
        .json(&json!({"model": model, "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .expect("send");
    let engine = r
        .headers()
        .get("x-switchyard-engine")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (r.status().as_u16(), engine)
}

/// Through the router: an adapter reaches only the engines that hold it (learned from
/// their `/v1/models`); the router's load puts an adapter on the number of engines asked,
/// routable at once, then on the rest; its unload takes it off everywhere, after which
/// the name is unknown again; an engine's refusal comes back as the engine gave it.
#[tokio::test]
async fn the_router_routes_adapters_to_their_engines_and_loads_them() {
    let d = TempDir::new("router");
    make_adapter(&d.path("sql"), 1, 8, &["--layers", "2"]);
    make_adapter(&d.path("chat"), 2, 8, &["--layers", "2"]);
    let sql_arg = format!("sql={}", d.path("sql"));
    let e1 = lora_engine(&["--lora-modules", &sql_arg]);
    let e2 = lora_engine(&[]);
    let router = Proc::router(&[&e1.url, &e2.url], &["--routing-logic", "roundrobin"]);
    let c = client();

    for _ in 0..6 {
        assert_eq!(routed(&c, &router, "sql").await, (200, e1.host_port()));
    }
    let served: std::collections::HashSet<String> =
        futures_util::future::join_all((0..6).map(|_| routed(&c, &router, "base")))
            .await
            .into_iter()
            .map(|(s, e)| {
                assert_eq!(s, 200);
                e
            })
            .collect();
    assert_eq!(
        served.len(),
        2,
        "the base model on both engines: {served:?}"
    );
    let models = model_ids(&c, &router).await;
    let sql = models
        .iter()
        .find(|m| m["id"] == "sql")
        .expect("sql listed");
    assert_eq!(sql["parent"], "base");

    let load = router.url("/v1/load_lora_adapter");
    let (s, b) = post(
        &c,
        &load,
        &json!({"lora_name": "chat", "lora_path": d.path("chat"), "replicas": 1}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).expect("JSON");
    let loaded: Vec<String> = serde_json::from_value(v["loaded"].clone()).expect("loaded");
    assert_eq!(loaded.len(), 1, "{v}");
    for _ in 0..4 {
        assert_eq!(routed(&c, &router, "chat").await, (200, loaded[0].clone()));
    }
    let other = if loaded[0] == e1.host_port() {
        &e2
    } else {
        &e1
    };
    assert!(model_ids(&c, other).await.iter().all(|m| m["id"] != "chat"));

    // Again without replicas: onto the other engine too.
    let (s, b) = post(
        &c,
        &load,
        &json!({"lora_name": "chat", "lora_path": d.path("chat")}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).expect("JSON");
    assert_eq!(v["loaded"], json!([other.host_port()]), "{v}");
    assert_eq!(v["already_loaded"], json!([loaded[0]]), "{v}");
    assert!(model_ids(&c, other).await.iter().any(|m| m["id"] == "chat"));

    // An engine's refusal, as it gave it.
    let (s, b) = post(
        &c,
        &load,
        &json!({"lora_name": "ghost", "lora_path": d.path("missing")}),
    )
    .await;
    assert_eq!(s, 404, "{b}");
    assert!(error_of(&b).1.contains("No adapter found for"), "{b}");
    let (s, b) = post(&c, &load, &json!({"lora_name": "x"})).await;
    assert_eq!(
        (s, error_of(&b).0.as_str()),
        (400, "InvalidUserInput"),
        "{b}"
    );

    let unload = router.url("/v1/unload_lora_adapter");
    let (s, b) = post(&c, &unload, &json!({"lora_name": "chat"})).await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).expect("JSON");
    assert_eq!(v["unloaded"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(routed(&c, &router, "chat").await.0, 404);
    for e in [&e1, &e2] {
        assert!(model_ids(&c, e).await.iter().all(|m| m["id"] != "chat"));
    }
    let (s, b) = post(&c, &unload, &json!({"lora_name": "chat"})).await;
    assert_eq!(s, 404, "{b}");
    // sql untouched.
    assert_eq!(routed(&c, &router, "sql").await, (200, e1.host_port()));
}

/// `--lora-affinity`: with an adapter on both engines, its requests gather on one (its
/// home) while base-model requests still go round; without the flag, round robin spreads
/// the adapter too.
#[tokio::test]
async fn lora_affinity_keeps_an_adapter_on_its_home_engine() {
    let d = TempDir::new("affinity");
    make_adapter(&d.path("sql"), 1, 8, &["--layers", "2"]);
    let sql_arg = format!("sql={}", d.path("sql"));
    let e1 = lora_engine(&["--lora-modules", &sql_arg]);
    let e2 = lora_engine(&["--lora-modules", &sql_arg]);
    let c = client();
    let served = |router: &Proc, model: &'static str| {
        let (c, router_url) = (c.clone(), router.url("/v1/completions"));
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..6 {
                let r = c
                    .post(&router_url)
                    .json(&json!({"model": model, "prompt": "hi", "max_tokens": 2}))
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status().as_u16(), 200);
                let engine = r.headers()["x-switchyard-engine"].to_str().expect("header");
                seen.insert(engine.to_string());
            }
            seen
        }
    };
    let plain = Proc::router(&[&e1.url, &e2.url], &["--routing-logic", "roundrobin"]);
    assert_eq!(
        served(&plain, "sql").await.len(),
        2,
        "round robin spreads it"
    );
    let router = Proc::router(
        &[&e1.url, &e2.url],
        &["--routing-logic", "roundrobin", "--lora-affinity"],
    );
    assert_eq!(served(&router, "sql").await.len(), 1, "one home");
    assert_eq!(served(&router, "base").await.len(), 2, "base goes round");
}
