//! The validated configuration a node runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{ConfigError, Result};
use crate::schema::{Count, FileConfig, DEFAULT_COOKIE};

/// Everything a node needs, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    pub capacity: f64,
    pub threads: usize,
    pub cluster_listen: SocketAddr,
    /// Host part of this node's cluster address as peers dial it.
    pub advertise_host: String,
    pub leave_timeout: Duration,
    pub fault_injection: bool,
    /// `(host, port)` of each seed; hosts may be names (resolved when dialled).
    pub seeds: Vec<(String, u16)>,
    pub cookie: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_misses: u32,
    pub http_listen: SocketAddr,
    pub api_keys: Vec<String>,
    pub queue_limit: usize,
    pub max_body_bytes: usize,
    pub resume_wait: Duration,
    pub model_path: PathBuf,
    pub model_id: Option<String>,
    pub replicas: Count,
    pub stages: Count,
    pub max_batch: u32,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

fn host_port(key: &'static str, s: &str) -> Result<(String, u16)> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| invalid(key, format!("{s:?} is not host:port")))?;
    let port: u16 = port.parse().map_err(|_| invalid(key, format!("{s:?} has no valid port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(invalid(key, format!("{s:?} needs a host and a non-zero port")));
    }
    Ok((host.to_string(), port))
}

fn socket(key: &'static str, s: &str) -> Result<SocketAddr> {
    s.parse().map_err(|_| invalid(key, format!("{s:?} is not an IP:port address")))
}

impl NodeConfig {
    /// This node's cluster address as peers dial it (`host:port`).
    pub fn cluster_addr(&self) -> String {
        format!("{}:{}", self.advertise_host, self.cluster_listen.port())
    }

    /// The seeds as `host:port` strings.
    pub fn seed_addrs(&self) -> Vec<String> {
        self.seeds.iter().map(|(h, p)| format!("{h}:{p}")).collect()
    }
}

impl FileConfig {
    /// Checks every invariant, naming the key at fault, and converts to the runtime form.
    pub fn validate(&self) -> Result<NodeConfig> {
        let n = &self.node;
        if n.name.is_empty() || n.name.len() > 64 || !n.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(invalid("node.name", format!("{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'", n.name)));
        }
        if !n.capacity.is_finite() || n.capacity <= 0.0 {
            return Err(invalid("node.capacity", format!("{} must be a positive number", n.capacity)));
        }
        let c = &self.cluster;
        let cluster_listen = socket("cluster.listen", &c.listen)?;
        let seeds = c.seeds.iter().map(|s| host_port("cluster.seeds", s)).collect::<Result<Vec<_>>>()?;
        let advertise_host = match &c.advertise {
            Some(h) if h.is_empty() || h.contains(':') && h.parse::<std::net::Ipv6Addr>().is_err() => {
                return Err(invalid("cluster.advertise", format!("{h:?} must be a host name or IP address without a port")));
            }
            Some(h) => h.clone(),
            None if cluster_listen.ip().is_unspecified() => n.name.clone(),
            None => cluster_listen.ip().to_string(),
        };
        if n.leave_timeout_ms < 100 {
            return Err(invalid("node.leave_timeout_ms", format!("{} must be at least 100", n.leave_timeout_ms)));
        }
        if c.cookie.is_empty() {
            return Err(invalid("cluster.cookie", "must not be empty"));
        }
        if c.cookie == DEFAULT_COOKIE && !cluster_listen.ip().is_loopback() {
            return Err(invalid(
                "cluster.cookie",
                format!("the built-in default cookie is refused on the non-loopback address {cluster_listen}: set cluster.cookie or FLOTILLA_COOKIE"),
            ));
        }
        if c.heartbeat_interval_ms < 10 {
            return Err(invalid("cluster.heartbeat_interval_ms", format!("{} must be at least 10", c.heartbeat_interval_ms)));
        }
        if c.heartbeat_misses == 0 {
            return Err(invalid("cluster.heartbeat_misses", "must be at least 1"));
        }
        let h = &self.http;
        let http_listen = socket("http.listen", &h.listen)?;
        if h.queue_limit == 0 {
            return Err(invalid("http.queue_limit", "must be at least 1"));
        }
        if h.max_body_bytes < 1024 {
            return Err(invalid("http.max_body_bytes", format!("{} must be at least 1024", h.max_body_bytes)));
        }
        if self.model.path.as_os_str().is_empty() {
            return Err(invalid("model.path", "must not be empty"));
        }
        for (key, count) in [("parallelism.replicas", self.parallelism.replicas), ("parallelism.stages", self.parallelism.stages)] {
            if count == Count::Fixed(0) {
                return Err(invalid(key, "must be at least 1 or \"auto\""));
            }
        }
        if self.parallelism.max_batch == 0 || self.parallelism.max_batch > 1024 {
            return Err(invalid("parallelism.max_batch", format!("{} must be between 1 and 1024", self.parallelism.max_batch)));
        }
        Ok(NodeConfig {
            name: n.name.clone(),
            capacity: n.capacity,
            threads: n.threads,
            cluster_listen,
            advertise_host,
            leave_timeout: Duration::from_millis(n.leave_timeout_ms),
            fault_injection: n.fault_injection,
            seeds,
            cookie: c.cookie.clone(),
            heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms),
            heartbeat_misses: c.heartbeat_misses,
            http_listen,
            api_keys: h.api_keys.clone(),
            queue_limit: h.queue_limit,
            max_body_bytes: h.max_body_bytes,
            resume_wait: Duration::from_millis(h.resume_wait_ms),
            model_path: self.model.path.clone(),
            model_id: self.model.id.clone(),
            max_batch: self.parallelism.max_batch,
            replicas: self.parallelism.replicas,
            stages: self.parallelism.stages,
        })
    }
}
