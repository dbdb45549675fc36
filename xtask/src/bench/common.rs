//! What every bench shares: the machine line each table starts with, the
//! median of three, a timed shell step. The benches use this and never
//! each other's entry points' module (`bench::mod`), so there is no cycle.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;

/// The machine the figures were measured on, for each table's header.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb >> 20)
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cores ({model}), {mem} GiB")
}

/// The median of three runs of `f`.
pub fn median3(mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    let mut v = [f()?, f()?, f()?];
    v.sort_by(f64::total_cmp);
    Ok(v[1])
}

pub fn timed_sh(script: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let st = Command::new("bash").arg("-c").arg(script).status()?;
    if !st.success() {
        bail!("`{script}` failed: {st}");
    }
    Ok(t0.elapsed().as_secs_f64())
}
