//! The per-run record: boot phases (host and guest), how the run ended, stats and memory;
//! printed as a table (`--phases`) and written as JSON (`--json`). `bench` reads these back.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One phase mark, in nanoseconds since the bootbox process started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Phase {
    pub name: String,
    pub start_ns: u64,
    /// Reported by the guest through the phase port (else measured by the host).
    pub guest: bool,
}

/// Everything a run reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RunRecord {
    /// How the VM ended: "status", "reset", "timeout", "stopped" or "error".
    pub outcome: String,
    /// The exit code bootbox returned.
    pub exit_code: u8,
    /// Whether KVM had hardware virtualisation (otherwise times are not representative).
    pub kvm_hardware: bool,
    pub phases: Vec<Phase>,
    /// Peak resident memory of the bootbox process beyond the guest's RAM, in KiB.
    pub vmm_peak_rss_kib: Option<u64>,
    /// Whether this run had to build the appliance (false = cache hit).
    pub appliance_built: Option<bool>,
    /// The stats report (`--stats`), as printed.
    pub stats: Option<String>,
    /// Page faults of the bootbox process from its start to the end of the run: (minor,
    /// major). On a warm run these include the guest's first touches of snapshot pages (major
    /// when read from disk).
    #[serde(default)]
    pub page_faults: Option<(u64, u64)>,
    /// Guest memory resident on the host at the end (what the guest touched), in KiB.
    #[serde(default)]
    pub guest_resident_kib: Option<u64>,
}

/// The interval naming bootbox's own work before the first KVM_RUN.
pub const OWN_SETUP_WORK: &str = "own setup work (less KVM_CREATE_VM)";

impl RunRecord {
    /// Nanoseconds of the first phase called `name`.
    pub fn phase(&self, name: &str) -> Option<u64> {
        self.phases
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.start_ns)
    }

    /// The derived intervals users ask about, as (name, nanoseconds).
    pub fn intervals(&self) -> Vec<(&'static str, u64)> {
        let span = |label, from: &str, to: &str| {
            let (a, b) = (self.phase(from)?, self.phase(to)?);
            Some((label, b.checked_sub(a)?))
        };
        // bootbox's own work before the guest runs: launch to first KVM_RUN less the
        // KVM_CREATE_VM ioctl, whose time is the host kernel's and varies widely between hosts.
        let own_setup = || {
            let (_, to_run) = span("", "process start", "first KVM_RUN")?;
            let (_, create_vm) = span("", "kvm opened", "kvm vm created")?;
            Some((OWN_SETUP_WORK, to_run.checked_sub(create_vm)?))
        };
        [
            span("launch to first KVM_RUN", "process start", "first KVM_RUN"),
            own_setup(),
            span(
                "kernel boot (first KVM_RUN to init)",
                "first KVM_RUN",
                "init started",
            ),
            span("launch to init", "process start", "init started"),
            span("mounting shares", "init started", "shares mounted"),
            span("job", "job started", "job finished"),
            span("launch to job result", "process start", "job finished"),
            span("launch to VM exit", "process start", "vm exit"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    pub fn read_json(path: &Path) -> std::io::Result<RunRecord> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// The phase table: each phase's start offset, the time until the next phase, and that
    /// time's share of the whole run.
    pub fn table(&self) -> String {
        let mut phases = self.phases.clone();
        phases.sort_by_key(|p| p.start_ns);
        let total = phases.last().map_or(0, |p| p.start_ns).max(1);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<28} {:>12} {:>12} {:>7}",
            "phase", "start (ms)", "duration", "share"
        );
        for (i, p) in phases.iter().enumerate() {
            let next = phases.get(i + 1).map_or(p.start_ns, |n| n.start_ns);
            let dur = next - p.start_ns;
            let who = if p.guest { " (guest)" } else { "" };
            let _ = writeln!(
                out,
                "{:<28} {:>12.3} {:>12} {:>6.1}%",
                format!("{}{}", p.name, who),
                p.start_ns as f64 / 1e6,
                fmt_ns(dur),
                dur as f64 * 100.0 / total as f64
            );
        }
        for (name, ns) in self.intervals() {
            let _ = writeln!(out, "{name:<40} {:>12}", fmt_ns(ns));
        }
        if !self.kvm_hardware {
            let _ = writeln!(
                out,
                "note: KVM here has no hardware virtualisation (no vmx/svm): times are not representative"
            );
        }
        if let Some(kib) = self.vmm_peak_rss_kib {
            let _ = writeln!(
                out,
                "VMM peak RSS beyond guest memory: {:.1} MiB",
                kib as f64 / 1024.0
            );
        }
        if let (Some((minor, major)), Some(kib)) = (self.page_faults, self.guest_resident_kib) {
            let _ = writeln!(
                out,
                "page faults: {minor} minor, {major} major; guest memory touched: {:.1} MiB",
                kib as f64 / 1024.0
            );
        }
        out
    }
}

/// The process's (minor, major) page faults so far (getrusage).
pub fn page_faults() -> Option<(u64, u64)> {
    // SAFETY: rusage is plain data that getrusage fills for RUSAGE_SELF.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer to an rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    Some((usage.ru_minflt as u64, usage.ru_majflt as u64))
}

/// A duration in the unit that keeps three significant digits readable.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        n if n >= 1_000_000_000 => format!("{:.3} s", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.3} ms", n as f64 / 1e6),
        n => format!("{:.1} us", n as f64 / 1e3),
    }
}

/// Peak RSS of this process (VmHWM) minus the guest RAM resident at the end of the run: guest
/// pages are never given back while the VM lives, so that is the guest's share of the peak.
pub fn vmm_peak_rss_kib(guest_resident_kib: Option<u64>) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hwm: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(hwm.saturating_sub(guest_resident_kib?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RunRecord {
        let p = |name: &str, ms: u64, guest| Phase {
            name: name.into(),
            start_ns: ms * 1_000_000,
            guest,
        };
        RunRecord {
            outcome: "status".into(),
            exit_code: 0,
            kvm_hardware: true,
            phases: vec![
                p("process start", 0, false),
                p("kvm opened", 1, false),
                p("kvm vm created", 4, false),
                p("first KVM_RUN", 10, false),
                p("init started", 60, true),
                p("job started", 70, true),
                p("job finished", 90, true),
                p("vm exit", 100, false),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn intervals_are_differences_between_named_phases() {
        let r = record();
        let iv: std::collections::HashMap<_, _> = r.intervals().into_iter().collect();
        assert_eq!(iv["kernel boot (first KVM_RUN to init)"], 50_000_000);
        assert_eq!(iv["launch to init"], 60_000_000);
        assert_eq!(iv["job"], 20_000_000);
        assert_eq!(iv["launch to job result"], 90_000_000);
        // 10 ms to the first KVM_RUN, of which KVM_CREATE_VM took 3 ms.
        assert_eq!(iv[OWN_SETUP_WORK], 7_000_000);
        assert!(!iv.contains_key("mounting shares"));
    }

    #[test]
    fn table_shows_durations_and_shares_that_add_up() {
        let t = record().table();
        assert!(t.contains("init started (guest)"), "{t}");
        // first KVM_RUN -> init started is 50 ms of a 100 ms run.
        let line = t.lines().find(|l| l.starts_with("first KVM_RUN")).unwrap();
        assert!(
            line.contains("50.000 ms") && line.contains("50.0%"),
            "{line}"
        );
        assert!(!t.contains("not representative"));
    }

    #[test]
    fn json_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.json");
        record().write_json(&f).unwrap();
        let back = RunRecord::read_json(&f).unwrap();
        assert_eq!(back.phases, record().phases);
    }

    #[test]
    fn formats_durations_readably() {
        assert_eq!(fmt_ns(1_500), "1.5 us");
        assert_eq!(fmt_ns(2_345_678), "2.346 ms");
        assert_eq!(fmt_ns(3_000_000_000), "3.000 s");
    }
}
