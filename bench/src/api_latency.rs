//! `vmm-bench api-latency`: how long the machine API takes to answer, measured the way an
//! orchestrator sees it: one persistent connection to `vmm serve`'s socket, request after
//! request, the time from the first byte sent to the last byte of the response read.
//!
//! Two conditions: idle (a VM created but not booted, so `vm.info` is answered by `vmm serve`
//! itself) and busy (a VM of `--busy-memory` booted, `vm.info` forwarded to its `vmm run`
//! child while that pins its RAM on every CPU it may use). A busy sample counts only when the
//! `vm.info` answered with it, or the one just before a ping, says the VM is in its `pin`
//! phase, so the figure is what the API does while pinning runs, not after.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::{Client, Reply};
use api::{Endpoint, Method};
use serde::Serialize;

/// How long `vmm serve` may take to answer its first ping, and a request its answer.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the busy VM may take to reach its pin phase.
const PIN_WITHIN: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, clap::Args)]
pub struct ApiLatencyArgs {
    /// Requests of each endpoint in each condition (the busy one stops early if pinning ends
    /// first, and says how many it measured).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
    pub requests: u32,
    /// Guest RAM of the VM booted for the busy condition (pinned with `pin: populate`, no
    /// device); 0 measures the idle condition only.
    #[arg(long, default_value = "8G", value_parser = vmm::size::parse_size)]
    pub busy_memory: u64,
    /// The `vmm` binary to serve the API. Default: `vmm` beside this executable.
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{endpoint} answered {status}: {body}")]
    Refused {
        endpoint: &'static str,
        status: u16,
        body: String,
    },
    #[error("the busy VM did not reach its pin phase within {0:?} (last vm.info: {1})")]
    NoPinPhase(Duration, String),
}

impl pinning::Classify for LatencyError {
    fn class(&self) -> pinning::ErrorClass {
        pinning::ErrorClass::Internal
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LatencyError {
    let what = what.into();
    move |source| LatencyError::Io { what, source }
}

/// Latency figures of one endpoint in one condition, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub condition: String,
    pub endpoint: &'static str,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentile `p` (0..=100) of `samples`, sorted in place.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn row(condition: &str, endpoint: Endpoint, mut samples: Vec<Duration>) -> Row {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    Row {
        condition: condition.into(),
        endpoint: endpoint.name(),
        requests: samples.len(),
        p50_ms: ms(percentile(&mut samples, 50.0)),
        p99_ms: ms(percentile(&mut samples, 99.0)),
        max_ms: ms(samples.last().copied().unwrap_or_default()),
    }
}

/// `vmm serve` as a child, shut down (then killed if it will not go) when dropped.
struct Serve {
    child: Child,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(vmm: &Path) -> Result<(Serve, Client), LatencyError> {
        let dir = tempfile::Builder::new()
            .prefix("vmm-api-latency")
            .tempdir()
            .map_err(io("making a temporary directory"))?;
        let socket = dir.path().join("api.sock");
        let child = Command::new(vmm)
            .arg("serve")
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {} serve", vmm.display())))?;
        let serve = Serve { child, dir };
        let started = Instant::now();
        loop {
            match Client::connect(&socket, REQUEST_TIMEOUT) {
                Ok(client) => return Ok((serve, client)),
                Err(e) if started.elapsed() > CONNECT_WITHIN => {
                    return Err(io(format!("connecting to {}", socket.display()))(e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let socket = self.dir.path().join("api.sock");
        if let Ok(mut c) = Client::connect(&socket, Duration::from_secs(30)) {
            let _ = c.request(Method::Put, &Endpoint::VmmShutdown.path(), None);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("vmm serve did not end after vmm.shutdown; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request, timed; a status other than `expect` is an error naming the endpoint.
fn timed(
    client: &mut Client,
    endpoint: Endpoint,
    body: Option<&[u8]>,
    expect: u16,
) -> Result<(Duration, Reply), LatencyError> {
    let started = Instant::now();
    let reply = client
        .request(endpoint.method(), &endpoint.path(), body)
        .map_err(io(endpoint.name()))?;
    let took = started.elapsed();
    if reply.status != expect {
        return Err(LatencyError::Refused {
            endpoint: endpoint.name(),
            status: reply.status,
            body: String::from_utf8_lossy(&reply.body).into_owned(),
        });
    }
    Ok((took, reply))
}

/// The `vmm.phase` a vm.info body names.
fn phase(info: &Reply) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&info.body).ok()?;
    v.pointer("/vmm/phase")?.as_str().map(str::to_owned)
}

fn config(memory: u64) -> Vec<u8> {
    serde_json::json!({ "memory": { "size": memory }, "vmm": { "pin": "populate" } })
        .to_string()
        .into_bytes()
}

/// Runs both conditions; one row per condition and endpoint.
pub fn run(args: &ApiLatencyArgs, vmm: &Path) -> Result<Vec<Row>, LatencyError> {
    let (_serve, mut client) = Serve::start(vmm)?;
    let n = args.requests as usize;
    let mut rows = Vec::new();

    timed(
        &mut client,
        Endpoint::VmCreate,
        Some(&config(256 << 20)),
        204,
    )?;
    let (mut ping, mut info) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        ping.push(timed(&mut client, Endpoint::VmmPing, None, 200)?.0);
        info.push(timed(&mut client, Endpoint::VmInfo, None, 200)?.0);
    }
    rows.push(row("idle", Endpoint::VmmPing, ping));
    rows.push(row("idle", Endpoint::VmInfo, info));
    timed(&mut client, Endpoint::VmDelete, None, 204)?;
    if args.busy_memory == 0 {
        return Ok(rows);
    }

    timed(
        &mut client,
        Endpoint::VmCreate,
        Some(&config(args.busy_memory)),
        204,
    )?;
    timed(&mut client, Endpoint::VmBoot, None, 204)?;
    let started = Instant::now();
    loop {
        let (_, reply) = timed(&mut client, Endpoint::VmInfo, None, 200)?;
        match phase(&reply).as_deref() {
            Some("pin") => break,
            _ if started.elapsed() > PIN_WITHIN => {
                let body = String::from_utf8_lossy(&reply.body).into_owned();
                return Err(LatencyError::NoPinPhase(PIN_WITHIN, body));
            }
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    let (mut ping, mut info) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut pinning = true;
    while pinning && (ping.len() < n || info.len() < n) {
        let (took, _) = timed(&mut client, Endpoint::VmmPing, None, 200)?;
        let (took_info, reply) = timed(&mut client, Endpoint::VmInfo, None, 200)?;
        pinning = phase(&reply).as_deref() == Some("pin");
        if pinning {
            ping.push(took);
            info.push(took_info);
        }
    }
    let condition = format!(
        "pinning {}",
        crate::startup::args::short_size(args.busy_memory)
    );
    rows.push(row(&condition, Endpoint::VmmPing, ping));
    rows.push(row(&condition, Endpoint::VmInfo, info));
    timed(&mut client, Endpoint::VmShutdown, None, 204)?;
    timed(&mut client, Endpoint::VmDelete, None, 204)?;
    Ok(rows)
}

/// The rows as a table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<14} {:<12} {:>8} {:>8} {:>8} {:>8}\n",
        "condition", "endpoint", "requests", "p50_ms", "p99_ms", "max_ms"
    );
    for r in rows {
        out += &format!(
            "{:<14} {:<12} {:>8} {:>8.3} {:>8.3} {:>8.3}\n",
            r.condition, r.endpoint, r.requests, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&mut s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&mut s, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
        let mut one = [Duration::from_millis(7)];
        assert_eq!(percentile(&mut one, 99.0), Duration::from_millis(7));
    }
}
