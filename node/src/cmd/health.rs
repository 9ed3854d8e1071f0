//! `flotilla health`: exits 0 when a node's HTTP endpoint answers 200 (a container HEALTHCHECK that
//! needs no curl in the image).

use std::time::Duration;

use clap::Args;

#[derive(Args)]
pub struct HealthArgs {
    /// The URL to probe.
    #[arg(long, default_value = "http://127.0.0.1:8080/ready")]
    pub url: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
}

/// Returns the exit code: 0 for HTTP 200, 1 otherwise (with the reason on stderr).
pub fn run(args: HealthArgs) -> anyhow::Result<i32> {
    let timeout = Duration::try_from_secs_f64(args.timeout).map_err(|_| anyhow::anyhow!("--timeout must be a positive number of seconds"))?;
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    match agent.get(&args.url).call() {
        Ok(r) if r.status() == 200 => Ok(0),
        Ok(r) => {
            eprintln!("{}: HTTP {}", args.url, r.status());
            Ok(1)
        }
        Err(ureq::Error::Status(code, r)) => {
            eprintln!("{}: HTTP {code}: {}", args.url, r.into_string().unwrap_or_default().trim());
            Ok(1)
        }
        Err(e) => {
            eprintln!("{}: {e}", args.url);
            Ok(1)
        }
    }
}
