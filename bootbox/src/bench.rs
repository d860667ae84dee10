//! `bootbox bench`: repeated runs after warm-ups, per-phase statistics (min, median, p95,
//! mean, sample standard deviation), an interleaved A/B comparison against another command,
//! and `--analyze`, which lists the slowest kernel initcalls collected through the appliance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use super::args::BenchArgs;
use super::report::{fmt_ns, RunRecord};
use super::EXIT_LAUNCHER;

/// Summary statistics of a sample, in nanoseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator; 0 for a single sample).
    pub stddev: f64,
}

/// Linear-interpolated quantile of sorted data (`q` in 0..=1).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let mean = s.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some(Summary {
        n,
        min: s[0],
        median: quantile(&s, 0.5),
        p95: quantile(&s, 0.95),
        mean,
        stddev: var.sqrt(),
    })
}

#[derive(Debug, Default, Serialize)]
struct Side {
    /// What ran.
    command: String,
    /// End-to-end wall time of each measured run, measured here (ns).
    wall_ns: Vec<f64>,
    /// Per-phase samples (ns), for runs that reported phases.
    phases: BTreeMap<String, Vec<f64>>,
    /// Memory samples of runs that reported them: the VMM's own peak RSS and the guest
    /// memory touched (KiB), and the process's minor and major page faults.
    memory: BTreeMap<String, Vec<f64>>,
    failures: usize,
}

/// The memory figures of a run record, by the name the memory table prints.
fn memory_figures(r: &RunRecord) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    if let Some(kib) = r.vmm_peak_rss_kib {
        out.push((MEM_VMM_RSS, kib as f64));
    }
    if let Some(kib) = r.guest_resident_kib {
        out.push((MEM_GUEST_TOUCHED, kib as f64));
    }
    if let Some((minor, major)) = r.page_faults {
        out.push((MEM_MINOR_FAULTS, minor as f64));
        out.push((MEM_MAJOR_FAULTS, major as f64));
    }
    out
}

const MEM_VMM_RSS: &str = "VMM peak RSS beyond guest memory (MiB)";
const MEM_GUEST_TOUCHED: &str = "guest memory touched (MiB)";
const MEM_MINOR_FAULTS: &str = "minor page faults";
const MEM_MAJOR_FAULTS: &str = "major page faults";

impl Side {
    fn add_record(&mut self, r: &RunRecord) {
        for (name, ns) in r.intervals() {
            self.phases
                .entry(name.to_string())
                .or_default()
                .push(ns as f64);
        }
        for (name, v) in memory_figures(r) {
            self.memory.entry(name.to_string()).or_default().push(v);
        }
    }
}

/// A memory sample (KiB, or a count) as the memory table prints it.
fn fmt_memory(name: &str, x: f64) -> String {
    if name.ends_with("(MiB)") {
        format!("{:.1}", x / 1024.0)
    } else {
        format!("{x:.0}")
    }
}

/// Prints the ratio of the medians of `a` and `b` (each median shown with `show`) and
/// returns it; nothing when either side has no samples or B's median is zero.
fn ratio_line(name: &str, a: &[f64], b: &[f64], show: impl Fn(f64) -> String) -> Option<f64> {
    let (sa, sb) = (summarize(a)?, summarize(b)?);
    if sb.median <= 0.0 {
        return None;
    }
    let r = sa.median / sb.median;
    println!(
        "{name:<40} {r:>8.3}  ({} vs {})",
        show(sa.median),
        show(sb.median)
    );
    Some(r)
}

/// The memory table of one side (KiB figures shown in MiB), if its runs reported memory.
fn print_memory(side: &Side) {
    if side.memory.is_empty() {
        return;
    }
    println!(
        "{:<40} {:>4} {:>11} {:>11} {:>11}",
        "memory", "n", "min", "median", "p95"
    );
    for (name, v) in &side.memory {
        if let Some(s) = summarize(v) {
            let f = |x: f64| fmt_memory(name, x);
            println!(
                "{:<40} {:>4} {:>11} {:>11} {:>11}",
                name,
                s.n,
                f(s.min),
                f(s.median),
                f(s.p95)
            );
        }
    }
}

/// Runs `cmd` once, returns its wall time and its run record if it wrote one.
fn run_once(
    cmd: &mut Command,
    json: Option<&Path>,
    expect: i32,
) -> Result<(f64, Option<RunRecord>), String> {
    if let Some(j) = json {
        let _ = std::fs::remove_file(j);
    }
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let wall = start.elapsed().as_nanos() as f64;
    if out.status.code() != Some(expect) {
        return Err(format!(
            "{} ({})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let record = json.and_then(|j| RunRecord::read_json(j).ok());
    Ok((wall, record))
}

fn bootbox_command(target: &[String], json: &Path) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find bootbox itself: {e}"))?;
    let (sub, rest) = target.split_first().ok_or("nothing to benchmark")?;
    let mut c = Command::new(exe);
    c.arg(sub).arg("--json").arg(json).args(rest);
    Ok(c)
}

fn compare_command(shell: &str, json: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(shell.replace("{json}", &json.display().to_string()));
    c
}

fn print_table(label: &str, samples: &BTreeMap<String, Vec<f64>>, wall: &[f64]) {
    println!("\n{label}");
    println!(
        "{:<40} {:>4} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "phase", "n", "min", "median", "p95", "mean", "stddev"
    );
    let rows = samples
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .chain([("end-to-end (wall, measured by bench)", wall)]);
    for (name, v) in rows {
        if let Some(s) = summarize(v) {
            let f = |x: f64| fmt_ns(x as u64);
            println!(
                "{:<40} {:>4} {:>11} {:>11} {:>11} {:>11} {:>11}",
                name,
                s.n,
                f(s.min),
                f(s.median),
                f(s.p95),
                f(s.mean),
                f(s.stddev)
            );
        }
    }
}

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("bootbox-bench-{}", std::process::id()))
}

pub fn bench(a: BenchArgs) -> u8 {
    let dir = scratch_dir();
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|_| bench_in(&a, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bootbox bench: {e}");
            EXIT_LAUNCHER
        }
    }
}

fn bench_in(a: &BenchArgs, dir: &Path) -> Result<u8, String> {
    let target: Vec<String> = if a.target.is_empty() {
        vec!["run".into(), "--".into(), "true".into()]
    } else {
        a.target.clone()
    };
    let target = crate::disk::with_disk_args(target, &a.disks)?;
    if a.analyze {
        return analyze(&target, a.top);
    }
    let (ja, jb) = (dir.join("a.json"), dir.join("b.json"));
    let mut side_a = Side {
        command: format!("bootbox {}", target.join(" ")),
        ..Default::default()
    };
    let mut side_b = a.compare.as_ref().map(|c| Side {
        command: c.clone(),
        ..Default::default()
    });

    for i in 0..a.warmup + a.runs as usize {
        let measured = i >= a.warmup;
        match run_once(
            &mut bootbox_command(&target, &ja)?,
            Some(&ja),
            a.expect_status,
        ) {
            Ok((wall, rec)) if measured => {
                side_a.wall_ns.push(wall);
                if let Some(r) = rec {
                    side_a.add_record(&r);
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("bootbox bench: run {} of A failed: {e}", i + 1);
                side_a.failures += 1;
            }
        }
        if let (Some(b), Some(cmd)) = (side_b.as_mut(), a.compare.as_ref()) {
            match run_once(&mut compare_command(cmd, &jb), Some(&jb), 0) {
                Ok((wall, rec)) if measured => {
                    b.wall_ns.push(wall);
                    if let Some(r) = rec {
                        b.add_record(&r);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bootbox bench: run {} of B failed: {e}", i + 1);
                    b.failures += 1;
                }
            }
        }
    }

    print_table(
        &format!(
            "A: {} ({} runs after {} warm-ups)",
            side_a.command, a.runs, a.warmup
        ),
        &side_a.phases,
        &side_a.wall_ns,
    );
    print_memory(&side_a);
    let mut ratios = BTreeMap::new();
    if let Some(b) = &side_b {
        print_table(&format!("B: {}", b.command), &b.phases, &b.wall_ns);
        print_memory(b);
        println!("\nratios A/B of medians (below 1 means A is faster)");
        let mut pairs: Vec<(&str, &[f64], &[f64])> = side_a
            .phases
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_slice(), b.phases.get(k)?.as_slice())))
            .collect();
        pairs.push(("end-to-end (wall)", &side_a.wall_ns, &b.wall_ns));
        for (name, va, vb) in pairs {
            if let Some(r) = ratio_line(name, va, vb, |x| fmt_ns(x as u64)) {
                ratios.insert(name.to_string(), r);
            }
        }
        for (name, va) in &side_a.memory {
            let vb = b.memory.get(name).map_or(&[][..], Vec::as_slice);
            if let Some(r) = ratio_line(name, va, vb, |x| fmt_memory(name, x)) {
                ratios.insert(name.clone(), r);
            }
        }
    }
    if !vmm::vm::kvm_is_hardware_accelerated() {
        println!("\nnote: this host's KVM has no hardware virtualisation; absolute times are not representative");
    }
    if let Some(path) = &a.json {
        let summaries = |s: &Side| -> BTreeMap<String, Summary> {
            s.phases
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), summarize(v)?)))
                .chain(summarize(&s.wall_ns).map(|x| ("end-to-end (wall)".to_string(), x)))
                .collect()
        };
        let doc = serde_json::json!({
            "a": { "samples": &side_a, "summary": summaries(&side_a) },
            "b": side_b.as_ref().map(|b| serde_json::json!({ "samples": b, "summary": summaries(b) })),
            "ratios_a_over_b": ratios,
            "kvm_hardware": vmm::vm::kvm_is_hardware_accelerated(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let failed = side_a.failures + side_b.as_ref().map_or(0, |b| b.failures);
    Ok(if failed == 0 { 0 } else { 1 })
}

/// One initcall and how long it took.
#[derive(Debug, PartialEq)]
pub struct Initcall {
    pub name: String,
    pub usecs: u64,
}

/// Parses `initcall <fn>+0x../0x.. returned <r> after <n> usecs` lines of a kernel log.
pub fn parse_initcalls(log: &str) -> Vec<Initcall> {
    let mut out: Vec<Initcall> = log
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("initcall ")? + "initcall ".len()..];
            let (name, rest) = rest.split_once(" returned ")?;
            let after = rest.split_once(" after ")?.1;
            let usecs = after
                .strip_suffix(" usecs")
                .or_else(|| after.split_whitespace().next())?;
            let name = name.split('+').next().unwrap_or(name).to_string();
            Some(Initcall {
                name,
                usecs: usecs.trim().parse().ok()?,
            })
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.usecs));
    out
}

/// Boots the appliance with initcall_debug and prints the slowest initcalls, read from the
/// kernel's log buffer by `dmesg` inside the appliance (not from the slow serial console).
fn analyze(target: &[String], top: usize) -> Result<u8, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new(exe);
    c.args([
        "run",
        "--with",
        "dmesg",
        "--append",
        "initcall_debug log_buf_len=1M",
    ]);
    // Keep the user's VM options (e.g. --kernel, --mem) but replace the job.
    if target.first().map(String::as_str) == Some("run") {
        let opts = target[1..].iter().take_while(|a| a.as_str() != "--");
        c.args(opts);
    }
    c.args(["--", "dmesg"]);
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("the analysis boot failed ({})", out.status));
    }
    let log = String::from_utf8_lossy(&out.stdout);
    let calls = parse_initcalls(&log);
    if calls.is_empty() {
        return Err("the kernel log had no initcall lines (is initcall_debug supported?)".into());
    }
    let total: u64 = calls.iter().map(|c| c.usecs).sum();
    println!(
        "{} initcalls, {} in total; slowest {}:",
        calls.len(),
        fmt_ns(total * 1000),
        top.min(calls.len())
    );
    for c in calls.iter().take(top) {
        println!(
            "{:>12}  {:>5.1}%  {}",
            fmt_ns(c.usecs * 1000),
            c.usecs as f64 * 100.0 / total.max(1) as f64,
            c.name
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_the_sample_standard_deviation() {
        let s = summarize(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(s.n, 8);
        assert_eq!(s.min, 2.0);
        assert_eq!(s.mean, 5.0);
        assert_eq!(s.median, 4.5);
        // Population sd is 2.0; the sample sd is sqrt(32/7).
        assert!(
            (s.stddev - (32.0f64 / 7.0).sqrt()).abs() < 1e-12,
            "{}",
            s.stddev
        );
        assert!((s.p95 - 8.3).abs() < 1e-9, "{}", s.p95);
        let one = summarize(&[3.0]).unwrap();
        assert_eq!((one.stddev, one.median, one.p95), (0.0, 3.0, 3.0));
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn memory_samples_come_from_the_run_record() {
        let mut side = Side::default();
        side.add_record(&RunRecord {
            vmm_peak_rss_kib: Some(2048),
            guest_resident_kib: Some(10240),
            page_faults: Some((300, 2)),
            ..Default::default()
        });
        side.add_record(&RunRecord::default());
        assert_eq!(side.memory[MEM_VMM_RSS], [2048.0]);
        assert_eq!(side.memory[MEM_GUEST_TOUCHED], [10240.0]);
        assert_eq!(side.memory[MEM_MINOR_FAULTS], [300.0]);
        assert_eq!(side.memory[MEM_MAJOR_FAULTS], [2.0]);
        assert_eq!(fmt_memory(MEM_GUEST_TOUCHED, 10240.0), "10.0");
        assert_eq!(fmt_memory(MEM_MINOR_FAULTS, 300.0), "300");
    }

    #[test]
    fn initcalls_are_parsed_and_sorted_slowest_first() {
        let log = "[    0.1] calling  foo_init+0x0/0x20 @ 1\n\
                   [    0.2] initcall foo_init+0x0/0x20 returned 0 after 150 usecs\n\
                   [    0.3] initcall bar_setup+0x0/0x40 returned -19 after 2000 usecs\n\
                   garbage initcall line\n";
        let calls = parse_initcalls(log);
        assert_eq!(
            calls,
            vec![
                Initcall {
                    name: "bar_setup".into(),
                    usecs: 2000
                },
                Initcall {
                    name: "foo_init".into(),
                    usecs: 150
                }
            ]
        );
    }
}
