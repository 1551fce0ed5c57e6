//! Benchmark of an idle `crabboxd`: resident memory, CPU over an idle
//! period, and warm `GetStatus` round-trip latency (p50/p99) over the Unix
//! socket. Run with `bench/daemon.sh`; numbers go to docs/benchmarks.md.
//! Nothing here asserts: targets are compared by a person.

use std::time::Duration;

use crabbox_tests::TestDaemon;

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let idle_secs: u64 = std::env::var("CRABBOX_BENCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let calls: usize = std::env::var("CRABBOX_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);

    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "warn")
        .start()
        .await;
    let pid = d.pid();
    let rss_start = proc_field(pid, "status", "VmRSS:").unwrap();

    let c = d.client().await;
    for _ in 0..200 {
        c.status().await.unwrap();
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t0 = tokio::time::Instant::now();
        c.status().await.unwrap();
        samples.push(t0.elapsed());
    }
    samples.sort();
    let rss_warm = proc_field(pid, "status", "VmRSS:").unwrap();

    drop(c);
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let t0 = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu_secs = (cpu_ticks(pid) - t0) as f64 / ticks_per_sec;
    let rss_idle = proc_field(pid, "status", "VmRSS:").unwrap();

    println!("## crabboxd idle benchmark");
    println!();
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!(
        "| RSS after start | {:.1} MiB | ≤ 12 MiB |",
        rss_start as f64 / 1024.0
    );
    println!(
        "| RSS after {calls} status calls | {:.1} MiB | ≤ 12 MiB |",
        rss_warm as f64 / 1024.0
    );
    println!(
        "| RSS after {idle_secs} s idle | {:.1} MiB | ≤ 12 MiB |",
        rss_idle as f64 / 1024.0
    );
    println!(
        "| CPU over {idle_secs} s idle | {:.3} s ({:.4} %) | ≈ 0 |",
        idle_cpu_secs,
        100.0 * idle_cpu_secs / idle_secs as f64
    );
    println!(
        "| warm GetStatus RTT p50 / p99 / max ({calls} calls) | {:.3} ms / {:.3} ms / {:.3} ms | p50 ≤ 1 ms |",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
}
