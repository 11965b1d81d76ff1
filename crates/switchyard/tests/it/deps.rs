//! The workspace's dependency rules (ARCHITECTURE.md, "Dependency rules"), checked on the
//! real dependency tree as `cargo tree` resolves it.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages `cargo tree -p PKG` lists for normal (non-dev) dependencies.
fn tree(pkg: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            pkg,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {pkg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn offenders<'a>(deps: &'a BTreeSet<String>, banned: &[&str]) -> Vec<&'a String> {
    deps.iter()
        .filter(|d| {
            banned
                .iter()
                .any(|b| d.as_str() == *b || d.starts_with(&format!("{b}-")))
        })
        .collect()
}

#[test]
fn the_router_carries_no_model_runtime() {
    let deps = tree("switchyard-router");
    // Sanity: the tree was really read (the router's own contracts are in it).
    assert!(deps.contains("switchyard-kv-events"), "{deps:?}");
    assert!(deps.contains("switchyard-tokenizer"), "{deps:?}");
    let bad = offenders(
        &deps,
        &[
            "candle",
            "candle-core",
            "rayon",
            "gemm",
            "switchyard-engine",
        ],
    );
    assert!(bad.is_empty(), "the router must not depend on {bad:?}");
}

#[test]
fn shared_contracts_stay_small() {
    // protocol: wire types only, no runtime or I/O crates; the contracts the router shares
    // with the engine carry no model runtime and no async runtime.
    for (pkg, banned) in [
        (
            "switchyard-protocol",
            &["tokio", "axum", "hyper", "switchyard-http"][..],
        ),
        (
            "switchyard-kv-events",
            &["tokio", "candle-core", "rayon", "zeromq"][..],
        ),
        (
            "switchyard-tokenizer",
            &["tokio", "candle-core", "rayon"][..],
        ),
        ("switchyard-gguf", &["tokio", "candle-core", "rayon"][..]),
    ] {
        let deps = tree(pkg);
        assert!(deps.contains(pkg), "{pkg}: {deps:?}");
        let bad = offenders(&deps, banned);
        assert!(bad.is_empty(), "{pkg} must not depend on {bad:?}");
    }
    // ...and the engine really does carry the runtime, so the check above can fail.
    let engine = tree("switchyard-engine");
    assert!(!offenders(&engine, &["candle-core", "rayon"]).is_empty());
}
