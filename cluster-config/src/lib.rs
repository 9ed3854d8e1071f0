//! flotilla's configuration: the schema every node reads, loaded in layers (built-in defaults < file
//! given by `--config` < environment `FLOTILLA__SECTION__KEY` < command-line flags), then validated
//! with messages that name the key, and turned into the runtime [`NodeConfig`].

mod error;
mod load;
mod runtime;
mod schema;

pub use error::{ConfigError, Result};
pub use load::{load, Overrides};
pub use runtime::NodeConfig;
pub use schema::{ClusterSection, Count, FileConfig, HttpSection, ModelSection, NodeSection, ParallelismSection, DEFAULT_COOKIE};
