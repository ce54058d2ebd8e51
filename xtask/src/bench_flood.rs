//! `cargo xtask bench flood`: one session floods its terminal; what does that cost the
//! server and everyone else? usherd (recording on) next to OpenSSH's sshd, one run, on
//! loopback, the same client. For each server in turn: its memory growth under a client
//! that reads nothing (`ssh host 'cat /dev/zero' | sleep`), and a second session's
//! set-up time during that flood against its idle figure (medians). Then usherd's spool,
//! sampled while a client that does read floods it, against `spool.max_bytes`.
//! `USHER_BENCH_SCALE` shortens the floods and the logins for a smoke test.

use crate::bench_ssh::{first_byte, median, pss_kib, ssh_args, start_servers, Bench, Target};
use crate::util::{bench_scale_note, bench_scaled};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LOGINS: u64 = 10;
const SPOOL_MAX: u64 = 32 << 20;
/// The shipper's chunk: the spool may be past its limit by the write in flight, no more.
const CHUNK: u64 = 256 << 10;

pub fn run() -> Result<(), String> {
    let extra = format!("[spool]\nmax_bytes = {SPOOL_MAX}\n");
    let (bench, sshd_t, usher_t) = start_servers(&extra)?;
    println!(
        "one session floods; usherd (recording on) vs OpenSSH sshd, loopback, one run{}",
        bench_scale_note()
    );
    let (logins, flood_secs) = (bench_scaled(LOGINS), bench_scaled(FLOOD_SECS));

    // Idle set-up times, interleaved.
    let (mut s_idle, mut u_idle) = (vec![], vec![]);
    for _ in 0..logins {
        s_idle.push(first_byte(&bench, &sshd_t)?);
        u_idle.push(first_byte(&bench, &usher_t)?);
    }
    let s_idle = median(s_idle);
    let u_idle = median(u_idle);

    let s = under_flood(&bench, &sshd_t)?;
    let u = under_flood(&bench, &usher_t)?;
    println!(
        "server memory growth under a non-reading flood of {flood_secs} s: sshd {} KiB, usherd {} KiB (goal: usherd <= 65536 KiB)",
        s.grown_kib, u.grown_kib
    );
    println!(
        "second session's set-up, median of {logins}: sshd idle {:.1} ms, during flood {:.1} ms ({:.2}x); usherd idle {:.1} ms, during flood {:.1} ms ({:.2}x, goal <= 2x)",
        s_idle * 1e3,
        s.login * 1e3,
        s.login / s_idle,
        u_idle * 1e3,
        u.login * 1e3,
        u.login / u_idle
    );

    let (peak, took, ended) = spool_peak(&bench, &usher_t)?;
    println!(
        "usherd spool under a reading flood: peak {} KiB of max_bytes {} KiB + one chunk {} KiB ({}); session {} after {:.1} s",
        peak >> 10,
        SPOOL_MAX >> 10,
        CHUNK >> 10,
        if peak <= SPOOL_MAX + CHUNK { "held" } else { "EXCEEDED" },
        if ended { "ended by the agent" } else { "still running" },
        took
    );
    Ok(())
}

const FLOOD_SECS: u64 = 15;

struct Flooded {
    grown_kib: u64,
    login: f64,
}

fn flood(bench: &Bench, t: &Target, remote: &str, reader: &str) -> Result<Child, String> {
    let args: Vec<String> = ssh_args(bench, t)
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    Command::new("sh")
        .arg("-c")
        .arg(format!("exec ssh {} '{remote}' | {reader}", args.join(" ")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| e.to_string())
}

fn end(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
}

fn memory(t: &Target) -> u64 {
    (t.server_pids)().iter().map(|p| pss_kib(*p)).sum()
}

fn under_flood(bench: &Bench, t: &Target) -> Result<Flooded, String> {
    let before = memory(t);
    let mut child = flood(
        bench,
        t,
        "cat /dev/zero",
        &format!("sleep {}", bench_scaled(FLOOD_SECS) + 30),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let mut logins = vec![];
    for _ in 0..bench_scaled(LOGINS) {
        logins.push(first_byte(bench, t)?);
    }
    let deadline = Instant::now() + Duration::from_secs(bench_scaled(FLOOD_SECS));
    let mut peak = 0;
    while Instant::now() < deadline {
        peak = peak.max(memory(t));
        std::thread::sleep(Duration::from_millis(250));
    }
    end(&mut child);
    std::thread::sleep(Duration::from_millis(500));
    Ok(Flooded {
        grown_kib: peak.saturating_sub(before),
        login: median(logins),
    })
}

/// Peak spool size while a reading client floods, sampled every 20 ms.
fn spool_peak(bench: &Bench, t: &Target) -> Result<(u64, f64, bool), String> {
    let spool = bench.dir.join("spool");
    let start = Instant::now();
    let mut child = flood(bench, t, "cat /dev/urandom | base64", "cat > /dev/null")?;
    let mut peak = 0;
    let mut ended = false;
    while start.elapsed() < Duration::from_secs(60) {
        peak = peak.max(dir_bytes(&spool));
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            ended = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed().as_secs_f64();
    if !ended {
        end(&mut child);
    }
    Ok((peak, took, ended))
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
