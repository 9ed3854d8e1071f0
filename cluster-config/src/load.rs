//! Layered loading with the `config` crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};

use crate::error::{ConfigError, Result};
use crate::schema::FileConfig;

/// Values from command-line flags: the highest layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub capacity: Option<f64>,
    pub cluster_listen: Option<String>,
    pub http_listen: Option<String>,
    pub seeds: Option<Vec<String>>,
    pub cookie: Option<String>,
    pub model: Option<PathBuf>,
}

fn load_err(e: config::ConfigError) -> ConfigError {
    ConfigError::Load(e.to_string())
}

/// Loads defaults, then `file`, then the `FLOTILLA__SECTION__KEY` and `FLOTILLA_COOKIE` variables of
/// `env`, then `flags`. Unknown keys in any layer are errors that name the key.
pub fn load(file: Option<&Path>, env: &HashMap<String, String>, flags: &Overrides) -> Result<FileConfig> {
    let defaults = toml_string(&FileConfig::default())?;
    let mut b = Config::builder().add_source(File::from_str(&defaults, FileFormat::Toml));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Load(format!("configuration file {} does not exist", path.display())));
        }
        b = b.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    let vars: config::Map<String, String> = env.iter().filter(|(k, _)| k.starts_with("FLOTILLA__")).map(|(k, v)| (k.clone(), v.clone())).collect();
    b = b.add_source(
        Environment::with_prefix("FLOTILLA")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("cluster.seeds")
            .with_list_parse_key("http.api_keys")
            .source(Some(vars)),
    );
    if let Some(c) = env.get("FLOTILLA_COOKIE") {
        b = b.set_override("cluster.cookie", c.as_str()).map_err(load_err)?;
    }
    let o = flags;
    b = b
        .set_override_option("node.name", o.name.clone())
        .and_then(|b| b.set_override_option("node.capacity", o.capacity))
        .and_then(|b| b.set_override_option("cluster.listen", o.cluster_listen.clone()))
        .and_then(|b| b.set_override_option("http.listen", o.http_listen.clone()))
        .and_then(|b| b.set_override_option("cluster.seeds", o.seeds.clone()))
        .and_then(|b| b.set_override_option("cluster.cookie", o.cookie.clone()))
        .and_then(|b| b.set_override_option("model.path", o.model.as_ref().map(|p| p.display().to_string())))
        .map_err(load_err)?;
    let mut cfg: FileConfig = b.build().map_err(load_err)?.try_deserialize().map_err(load_err)?;
    cfg.cluster.seeds.retain(|s| !s.trim().is_empty());
    cfg.http.api_keys.retain(|s| !s.is_empty());
    Ok(cfg)
}

/// The defaults enter as the lowest layer, in the same format as a file.
fn toml_string(cfg: &FileConfig) -> Result<String> {
    toml::to_string(cfg).map_err(|e| ConfigError::Load(format!("serializing defaults: {e}")))
}
