//! The engine's HTTP surface on arbitrary request bodies: a sim engine (its tokenizer,
//! validation, templates, scheduler) answers every body to /v1/chat/completions,
//! /v1/completions and /tokenize with a 2xx, or a 4xx carrying an OpenAI error object —
//! never a panic, a 5xx or a hang. The first byte picks the path; bodies that parse as
//! JSON objects get `max_tokens` capped so valid ones finish fast.
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: switchyard_engine::EngineArgs,
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let cli = Cli::parse_from([
            "engine",
            "--backend",
            "sim",
            "--sim-preset",
            "zero",
            "--max-model-len",
            "512",
        ]);
        let app = rt.block_on(async {
            let engine = switchyard_engine::build_engine(&cli.args).expect("sim engine starts");
            switchyard_engine::api::router(engine)
        });
        Fixture { rt, app }
    })
}

const PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/tokenize"];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[which as usize % PATHS.len()];
    let body = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => {
            for k in ["max_tokens", "max_completion_tokens"] {
                if let Some(v) = o.get(k).and_then(|v| v.as_i64()) {
                    o.insert(k.into(), (v.clamp(-5, 16)).into());
                }
            }
            o.entry("max_tokens").or_insert(8.into());
            o.insert(
                "n".into(),
                o.get("n")
                    .and_then(|v| v.as_i64())
                    .map_or(1, |n| n.clamp(-1, 3))
                    .into(),
            );
            serde_json::to_vec(&o).expect("re-encodes")
        }
        _ => body.to_vec(),
    };
    let f = fixture();
    let (status, bytes) = f.rt.block_on(async {
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            f.app.clone().oneshot(req),
        )
        .await
        .expect("answered within 20 s")
        .expect("infallible");
        let status = resp.status();
        let bytes = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            resp.into_body().collect(),
        )
        .await
        .expect("body within 20 s")
        .expect("body")
        .to_bytes();
        (status, bytes)
    });
    assert!(
        !status.is_server_error(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if status.is_client_error() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("error body is JSON");
        let has_error =
            v.get("error").is_some() || v.get("detail").is_some() || v.get("message").is_some();
        assert!(has_error, "{status}: {v}");
    } else {
        assert_eq!(status, StatusCode::OK);
    }
});
