//! Configuration errors: each names the key at fault.

/// Why a configuration could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(String),

    #[error("invalid configuration key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ConfigError>;
