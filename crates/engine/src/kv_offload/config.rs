//! The offloading configuration, as vLLM + LMCache users write it:
//! `--kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'`
//! plus LMCache's settings, from `LMCACHE_*` environment variables or the YAML file named
//! by `LMCACHE_CONFIG_FILE` (the file wins where both say something, as in LMCache).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

/// vLLM's `KVTransferConfig` (the fields that matter here).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct KvTransferConfig {
    pub kv_connector: String,
    #[serde(default = "default_role")]
    pub kv_role: String,
    /// NixlConnector (P/D): what a failed pull of the prefill engine's KV does:
    /// `recompute` (vLLM's default: compute the prompt locally) or `fail`.
    #[serde(default = "default_failure_policy")]
    pub kv_load_failure_policy: String,
    /// vLLM's free-form extra settings; NixlConnector here reads `kv_lease_duration`
    /// (seconds a prefill engine keeps a finished prompt's blocks for its decode engine).
    #[serde(default)]
    pub kv_connector_extra_config: serde_json::Map<String, serde_json::Value>,
}

fn default_failure_policy() -> String {
    "recompute".into()
}

fn default_role() -> String {
    "kv_both".into()
}

impl KvTransferConfig {
    /// Parse the flag's JSON (a clap value parser).
    pub fn parse(s: &str) -> Result<KvTransferConfig, String> {
        let c: KvTransferConfig =
            serde_json::from_str(s).map_err(|e| format!("invalid --kv-transfer-config: {e}"))?;
        match c.kv_connector.as_str() {
            "LMCacheConnectorV1" | "LMCacheConnector" | "NixlConnector" => {}
            other => {
                return Err(format!(
                    "--kv-transfer-config: kv_connector {other:?} is not supported (LMCacheConnectorV1 and NixlConnector are)"
                ))
            }
        }
        match c.kv_load_failure_policy.as_str() {
            "recompute" | "fail" => {}
            other => {
                return Err(format!(
                    "--kv-transfer-config: kv_load_failure_policy {other:?}: expected recompute or fail"
                ))
            }
        }
        if let Some(v) = c.kv_connector_extra_config.get("kv_lease_duration") {
            match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => {}
                _ => {
                    return Err(format!(
                        "--kv-transfer-config: kv_connector_extra_config.kv_lease_duration {v}: expected a positive number of seconds"
                    ))
                }
            }
        }
        match c.kv_role.as_str() {
            "kv_both" | "kv_producer" | "kv_consumer" => Ok(c),
            other => Err(format!(
                "--kv-transfer-config: kv_role {other:?}: expected kv_both, kv_producer or kv_consumer"
            )),
        }
    }

    /// Prefill/decode disaggregation (vLLM's NixlConnector) rather than offloading.
    pub fn is_nixl(&self) -> bool {
        self.kv_connector == "NixlConnector"
    }

    /// A failed pull answers an error rather than recomputing (`kv_load_failure_policy`).
    pub fn fail_on_load_error(&self) -> bool {
        self.kv_load_failure_policy == "fail"
    }

    /// How long a prefill engine keeps a finished prompt's blocks for its decode engine:
    /// `kv_connector_extra_config.kv_lease_duration` (vLLM 0.32's setting), else
    /// `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` (older vLLMs' variable), else vLLM 0.32's 30 s.
    pub fn lease_duration(&self, env_timeout: Option<&str>) -> Result<f64, String> {
        if let Some(x) = self
            .kv_connector_extra_config
            .get("kv_lease_duration")
            .and_then(|v| v.as_f64())
        {
            return Ok(x);
        }
        match env_timeout {
            None => Ok(30.0),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    format!("VLLM_NIXL_ABORT_REQUEST_TIMEOUT {v:?}: expected positive seconds")
                }),
        }
    }

    /// Chunks are saved (`kv_both`, `kv_producer`).
    pub fn stores(&self) -> bool {
        self.kv_role != "kv_consumer"
    }

    /// Chunks are looked up and loaded (`kv_both`, `kv_consumer`).
    pub fn loads(&self) -> bool {
        self.kv_role != "kv_producer"
    }
}

/// LMCache's settings that the tiers follow (names and defaults as LMCache's config).
#[derive(Debug, Clone, PartialEq)]
pub struct LmCacheSettings {
    pub chunk_size: usize,
    pub local_cpu: bool,
    /// GB (10^9 bytes... LMCache counts GiB: 1024^3).
    pub max_local_cpu_size: f64,
    pub local_disk: Option<PathBuf>,
    pub max_local_disk_size: f64,
    pub remote_url: Option<String>,
    pub remote_serde: String,
    pub save_unfull_chunk: bool,
    pub blocking_timeout_secs: f64,
}

impl Default for LmCacheSettings {
    fn default() -> Self {
        LmCacheSettings {
            chunk_size: 256,
            local_cpu: true,
            max_local_cpu_size: 5.0,
            local_disk: None,
            max_local_disk_size: 0.0,
            remote_url: None,
            remote_serde: "naive".into(),
            save_unfull_chunk: false,
            blocking_timeout_secs: 10.0,
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl LmCacheSettings {
    pub fn max_local_cpu_bytes(&self) -> u64 {
        (self.max_local_cpu_size.max(0.0) * GIB) as u64
    }

    pub fn max_local_disk_bytes(&self) -> u64 {
        (self.max_local_disk_size.max(0.0) * GIB) as u64
    }

    /// From the process environment: `LMCACHE_CONFIG_FILE` (YAML), then `LMCACHE_*`.
    pub fn from_env() -> Result<LmCacheSettings, String> {
        let env: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("LMCACHE_"))
            .collect();
        let file = match env.get("LMCACHE_CONFIG_FILE") {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("LMCACHE_CONFIG_FILE {path}: {e}"))?,
            ),
            None => None,
        };
        LmCacheSettings::from_sources(&env, file.as_deref())
    }

    /// `env` holds `LMCACHE_*` variables; `yaml` the config file's text, if any.
    pub fn from_sources(
        env: &HashMap<String, String>,
        yaml: Option<&str>,
    ) -> Result<LmCacheSettings, String> {
        let mut kv: HashMap<String, String> = env
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("LMCACHE_")
                    .map(|k| (k.to_ascii_lowercase(), v.clone()))
            })
            .collect();
        if let Some(text) = yaml {
            let doc: HashMap<String, serde_yaml::Value> =
                serde_yaml::from_str(text).map_err(|e| format!("LMCACHE_CONFIG_FILE: {e}"))?;
            for (k, v) in doc {
                let s = match v {
                    serde_yaml::Value::Null => continue,
                    serde_yaml::Value::Bool(b) => b.to_string(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    serde_yaml::Value::String(s) => s,
                    _ => continue,
                };
                kv.insert(k, s);
            }
        }
        let mut s = LmCacheSettings::default();
        let num = |k: &str, v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("LMCache {k}: {v:?} is not a non-negative number"))
        };
        let flag = |k: &str, v: &str| match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(format!("LMCache {k}: {v:?} is not a boolean")),
        };
        let none = |v: &str| {
            let t = v.trim();
            t.is_empty() || t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("null")
        };
        for (k, v) in &kv {
            match k.as_str() {
                "chunk_size" => s.chunk_size = num(k, v)? as usize,
                "local_cpu" => s.local_cpu = flag(k, v)?,
                "max_local_cpu_size" => s.max_local_cpu_size = num(k, v)?,
                "local_disk" if none(v) => s.local_disk = None,
                "local_disk" => {
                    let path = v.trim().strip_prefix("file://").unwrap_or(v.trim());
                    s.local_disk = Some(PathBuf::from(path));
                }
                "max_local_disk_size" => s.max_local_disk_size = num(k, v)?,
                "remote_url" if none(v) => s.remote_url = None,
                "remote_url" => s.remote_url = Some(v.trim().to_string()),
                "remote_serde" => s.remote_serde = v.trim().to_string(),
                "save_unfull_chunk" => s.save_unfull_chunk = flag(k, v)?,
                "blocking_timeout_secs" => s.blocking_timeout_secs = num(k, v)?,
                // LMCache has many more settings (P2P, GDS, ...); not ours to refuse.
                _ => {}
            }
        }
        if s.chunk_size == 0 {
            return Err("LMCache chunk_size must be positive".into());
        }
        if s.remote_serde != "naive" {
            return Err(format!(
                "LMCache remote_serde {:?}: only \"naive\" (raw KV bytes) is supported",
                s.remote_serde
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn transfer_config_is_checked() {
        let c =
            KvTransferConfig::parse(r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#)
                .expect("ok");
        assert!(c.stores() && c.loads());
        let c = KvTransferConfig::parse(
            r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_consumer"}"#,
        )
        .expect("ok");
        assert!(!c.stores() && c.loads());
        assert!(KvTransferConfig::parse(r#"{"kv_connector":"P2pNcclConnector"}"#).is_err());
        let n = KvTransferConfig::parse(r#"{"kv_connector":"NixlConnector"}"#).expect("nixl");
        assert!(n.is_nixl() && !n.fail_on_load_error() && n.stores() && n.loads());
        assert_eq!(n.lease_duration(None), Ok(30.0));
        assert_eq!(n.lease_duration(Some("30")), Ok(30.0));
        assert!(n.lease_duration(Some("-1")).is_err());
        let n = KvTransferConfig::parse(
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_load_failure_policy":"fail","kv_connector_extra_config":{"kv_lease_duration":2.5}}"#,
        )
        .expect("nixl");
        assert!(n.fail_on_load_error() && !n.loads());
        assert_eq!(n.lease_duration(Some("30")), Ok(2.5), "the config wins");
        assert!(KvTransferConfig::parse(
            r#"{"kv_connector":"NixlConnector","kv_load_failure_policy":"retry"}"#
        )
        .is_err());
        assert!(KvTransferConfig::parse(
            r#"{"kv_connector":"NixlConnector","kv_connector_extra_config":{"kv_lease_duration":"x"}}"#
        )
        .is_err());
        assert!(
            KvTransferConfig::parse(r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"x"}"#)
                .is_err()
        );
        assert!(KvTransferConfig::parse("{").is_err());
    }

    #[test]
    fn env_then_file_with_lmcache_names_and_defaults() {
        let d = LmCacheSettings::from_sources(&HashMap::new(), None).expect("ok");
        assert_eq!(d, LmCacheSettings::default());
        let s = LmCacheSettings::from_sources(
            &env(&[
                ("LMCACHE_CHUNK_SIZE", "128"),
                ("LMCACHE_LOCAL_CPU", "False"),
                ("LMCACHE_LOCAL_DISK", "file:///tmp/kv/"),
                ("LMCACHE_MAX_LOCAL_DISK_SIZE", "2.5"),
                ("LMCACHE_REMOTE_URL", "lm://cache:65432"),
            ]),
            Some("chunk_size: 64\nblocking_timeout_secs: 2\nlocal_cpu: true\nmax_local_cpu_size: 0.5\n"),
        )
        .expect("ok");
        assert_eq!(s.chunk_size, 64, "the file wins");
        assert!(s.local_cpu);
        assert_eq!(s.max_local_cpu_bytes(), 1 << 29);
        assert_eq!(
            s.local_disk.as_deref(),
            Some(std::path::Path::new("/tmp/kv/"))
        );
        assert_eq!(s.max_local_disk_bytes(), (2.5 * GIB) as u64);
        assert_eq!(s.remote_url.as_deref(), Some("lm://cache:65432"));
        assert_eq!(s.blocking_timeout_secs, 2.0);
        assert!(LmCacheSettings::from_sources(&env(&[("LMCACHE_CHUNK_SIZE", "x")]), None).is_err());
        assert!(
            LmCacheSettings::from_sources(&env(&[("LMCACHE_REMOTE_SERDE", "cachegen")]), None)
                .is_err()
        );
        assert!(LmCacheSettings::from_sources(&HashMap::new(), Some("[1, 2]")).is_err());
    }
}
