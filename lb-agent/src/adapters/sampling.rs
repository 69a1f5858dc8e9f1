//! Sampling a scaled service's instances once a second, each sampler a task
//! of its own (Docker's stats API can take a second to answer; the agent's
//! loop must not wait on it): instance CPU from the orchestrator, host CPU
//! from /proc/stat, and requests per second from the instances' own
//! counters where `[service.instances.requests]` names one.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use tokio::{task::JoinHandle, time::Instant};
use tracing::warn;

use super::requests::{rate, scrape};
use crate::{
    config::instances::{RequestsMetric, Selector},
    ports::Orchestrator,
};

/// The sampler tasks of one service and the latest values they read. The
/// tasks stop when this is dropped.
pub struct Samplers {
    /// Latest CPU per instance.
    cpu: Arc<Mutex<HashMap<String, f64>>>,
    /// Host CPU busy, percent of all CPUs.
    host_cpu: Arc<Mutex<Option<f64>>>,
    /// Latest requests per second per instance, and the instances to read
    /// (both empty without `[service.instances.requests]`).
    requests: Arc<Mutex<HashMap<String, f64>>>,
    scrape_targets: Arc<Mutex<Vec<(String, SocketAddrV4)>>>,
    /// The CPU sampler, and the request counter's when configured.
    tasks: Vec<JoinHandle<()>>,
}

impl Samplers {
    pub fn start<O: Orchestrator + 'static>(
        service: &str,
        orch: Arc<O>,
        requests: Option<&RequestsMetric>,
    ) -> Samplers {
        let cpu = Arc::new(Mutex::new(HashMap::new()));
        let host_cpu = Arc::new(Mutex::new(None));
        let mut tasks = vec![tokio::spawn(sample_cpu(service.to_owned(), orch, cpu.clone(), host_cpu.clone()))];
        let rps = Arc::new(Mutex::new(HashMap::new()));
        let scrape_targets = Arc::new(Mutex::new(Vec::new()));
        if let Some(metric) = requests {
            tasks.push(tokio::spawn(sample_requests(metric.clone(), scrape_targets.clone(), rps.clone())));
        }
        Samplers { cpu, host_cpu, requests: rps, scrape_targets, tasks }
    }

    /// Latest CPU per instance, percent of one core.
    pub fn cpu(&self) -> Option<HashMap<String, f64>> {
        self.cpu.lock().ok().map(|m| m.clone())
    }

    /// Latest requests per second per instance.
    pub fn requests(&self) -> Option<HashMap<String, f64>> {
        self.requests.lock().ok().map(|m| m.clone())
    }

    /// Host CPU busy, percent of all CPUs.
    pub fn host_cpu(&self) -> Option<f64> {
        self.host_cpu.lock().ok().and_then(|h| *h)
    }

    /// The instances whose request counters to read, by id.
    pub fn set_scrape_targets(&self, targets: Vec<(String, SocketAddrV4)>) {
        if let Ok(mut t) = self.scrape_targets.lock() {
            *t = targets;
        }
    }

    pub fn stop(&self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl Drop for Samplers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sample instance and host CPU once a second, until aborted.
async fn sample_cpu<O: Orchestrator>(
    service: String,
    orch: Arc<O>,
    into: Arc<Mutex<HashMap<String, f64>>>,
    host: Arc<Mutex<Option<f64>>>,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut host_before = read_host_cpu();
    loop {
        every.tick().await;
        let host_now = read_host_cpu();
        if let (Some(b), Some(n), Ok(mut h)) = (host_before, host_now, host.lock()) {
            *h = host_busy_percent(b, n);
        }
        host_before = host_now;
        match orch.cpu_percent().await {
            Ok(cpu) => {
                if let Ok(mut m) = into.lock() {
                    *m = cpu;
                }
            }
            Err(e) => warn!(service, error = %e, "reading instance CPU failed"),
        }
    }
}

/// Scrape each instance's request counter once a second, until aborted;
/// `into` gets a rate for every instance read twice in a row.
async fn sample_requests(
    metric: RequestsMetric,
    targets: Arc<Mutex<Vec<(String, SocketAddrV4)>>>,
    into: Arc<Mutex<HashMap<String, f64>>>,
) {
    // Validated with the config.
    let Ok(selector) = metric.counter.parse::<Selector>() else { return };
    let (selector, path) = (Arc::new(selector), Arc::new(metric.path));
    let mut last: HashMap<String, (f64, Instant)> = HashMap::new();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now: Vec<(String, SocketAddrV4)> = targets.lock().map(|t| t.clone()).unwrap_or_default();
        // All at once: one slow instance must not hold up the others.
        let reads: Vec<_> = now
            .into_iter()
            .map(|(id, addr)| {
                let (selector, path) = (selector.clone(), path.clone());
                tokio::spawn(async move {
                    let body = scrape(addr, &path, std::time::Duration::from_millis(800)).await;
                    (id, body.ok().and_then(|b| selector.sum(&b)), Instant::now())
                })
            })
            .collect();
        let (mut seen, mut rates) = (HashMap::new(), HashMap::new());
        for read in reads {
            let Ok((id, Some(value), at)) = read.await else { continue };
            if let Some(r) = last.get(&id).and_then(|before| rate(*before, (value, at))) {
                rates.insert(id.clone(), r);
            }
            seen.insert(id, (value, at));
        }
        last = seen;
        if let Ok(mut m) = into.lock() {
            *m = rates;
        }
    }
}

/// (busy, total) jiffies over all CPUs, from the first line of /proc/stat.
fn read_host_cpu() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn host_busy_percent((busy0, total0): (u64, u64), (busy1, total1): (u64, u64)) -> Option<f64> {
    let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
    Some(100.0 * busy1.saturating_sub(busy0) as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cpu_from_proc_stat() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, (200, 1000));
        let b = parse_proc_stat("cpu  250 0 150 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(host_busy_percent(a, b), Some(100.0 * 200.0 / 300.0));
        assert_eq!(host_busy_percent(b, b), None);
        assert!(parse_proc_stat("intr 1 2").is_none());
        assert!(read_host_cpu().is_some());
    }
}
