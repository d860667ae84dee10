//! Optional VM-exit statistics: exits by reason, and accesses and handler time per device
//! range. Switched at runtime; when off, the vCPU hot path only tests one boolean. All counters
//! are atomics, so vCPU threads never contend on a lock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The exit reasons we count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Interrupted,
    Other,
}

const KINDS: [(ExitKind, &str); 7] = [
    (ExitKind::IoIn, "io-in"),
    (ExitKind::IoOut, "io-out"),
    (ExitKind::MmioRead, "mmio-read"),
    (ExitKind::MmioWrite, "mmio-write"),
    (ExitKind::Hlt, "hlt"),
    (ExitKind::Interrupted, "interrupted (signal)"),
    (ExitKind::Other, "other"),
];

/// Name used for accesses that hit no device.
pub const UNMAPPED_PIO: &str = "unmapped port";
pub const UNMAPPED_MMIO: &str = "unmapped mmio";

struct DeviceCounters {
    name: &'static str,
    mmio: bool,
    count: AtomicU64,
    nanos: AtomicU64,
}

/// Live counters, shared by all vCPU threads.
pub struct Stats {
    enabled: bool,
    exits: [AtomicU64; KINDS.len()],
    devices: Vec<DeviceCounters>,
}

impl Stats {
    /// Counters for the given `(name, is_mmio)` device ranges (plus the two unmapped buckets).
    pub fn new(enabled: bool, devices: impl IntoIterator<Item = (&'static str, bool)>) -> Self {
        let mut list: Vec<DeviceCounters> = Vec::new();
        let all = devices
            .into_iter()
            .chain([(UNMAPPED_PIO, false), (UNMAPPED_MMIO, true)]);
        for (name, mmio) in all {
            if !list.iter().any(|d| d.name == name && d.mmio == mmio) {
                list.push(DeviceCounters {
                    name,
                    mmio,
                    count: AtomicU64::new(0),
                    nanos: AtomicU64::new(0),
                });
            }
        }
        Stats {
            enabled,
            exits: Default::default(),
            devices: list,
        }
    }

    /// Whether counting is on (the only cost on the hot path when it is off).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts one exit.
    #[inline]
    pub fn exit(&self, kind: ExitKind) {
        if self.enabled {
            let i = KINDS
                .iter()
                .position(|k| k.0 == kind)
                .unwrap_or(KINDS.len() - 1);
            self.exits[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one access to device `name` that took `spent` in its handler.
    pub fn device(&self, name: &'static str, mmio: bool, spent: Duration) {
        if !self.enabled {
            return;
        }
        if let Some(d) = self
            .devices
            .iter()
            .find(|d| d.mmio == mmio && d.name == name)
        {
            d.count.fetch_add(1, Ordering::Relaxed);
            d.nanos
                .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// A snapshot, or `None` when stats are off.
    pub fn report(&self) -> Option<Report> {
        self.enabled.then(|| Report {
            exits: KINDS
                .iter()
                .zip(&self.exits)
                .map(|((_, n), c)| (*n, c.load(Ordering::Relaxed)))
                .filter(|(_, c)| *c > 0)
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceRow {
                    name: d.name,
                    mmio: d.mmio,
                    count: d.count.load(Ordering::Relaxed),
                    total: Duration::from_nanos(d.nanos.load(Ordering::Relaxed)),
                })
                .filter(|r| r.count > 0)
                .collect(),
        })
    }
}

/// One device's accesses in a [`Report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRow {
    pub name: &'static str,
    pub mmio: bool,
    pub count: u64,
    pub total: Duration,
}

/// What [`Stats`] counted; its `Display` is a table.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Report {
    /// (exit reason, count), reasons that never happened left out.
    pub exits: Vec<(&'static str, u64)>,
    pub devices: Vec<DeviceRow>,
}

impl Report {
    /// Count of exits with reason `name`.
    pub fn exit_count(&self, name: &str) -> u64 {
        self.exits.iter().find(|e| e.0 == name).map_or(0, |e| e.1)
    }

    /// Accesses counted for device `name`.
    pub fn device_count(&self, name: &str) -> u64 {
        self.devices
            .iter()
            .filter(|d| d.name == name)
            .map(|d| d.count)
            .sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<24} {:>10}", "vm exit reason", "count")?;
        for (name, count) in &self.exits {
            writeln!(f, "{name:<24} {count:>10}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<24} {:>5} {:>10} {:>12} {:>10}",
            "device", "bus", "accesses", "total us", "avg ns"
        )?;
        for d in &self.devices {
            let avg = d.total.as_nanos() / u128::from(d.count.max(1));
            writeln!(
                f,
                "{:<24} {:>5} {:>10} {:>12.1} {:>10}",
                d.name,
                if d.mmio { "mmio" } else { "pio" },
                d.count,
                d.total.as_secs_f64() * 1e6,
                avg
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_counts_nothing() {
        let s = Stats::new(false, [("serial", false)]);
        s.exit(ExitKind::IoOut);
        s.device("serial", false, Duration::from_nanos(5));
        assert!(s.report().is_none());
    }

    #[test]
    fn counts_by_reason_and_device_and_prints_a_table() {
        let s = Stats::new(true, [("serial", false), ("virtio-9p", true)]);
        s.exit(ExitKind::IoOut);
        s.exit(ExitKind::IoOut);
        s.exit(ExitKind::MmioRead);
        s.device("serial", false, Duration::from_nanos(300));
        s.device("serial", false, Duration::from_nanos(100));
        s.device(UNMAPPED_MMIO, true, Duration::from_nanos(1));
        let r = s.report().unwrap();
        assert_eq!(r.exit_count("io-out"), 2);
        assert_eq!(r.exit_count("mmio-read"), 1);
        assert_eq!(r.exit_count("hlt"), 0);
        assert_eq!(r.device_count("serial"), 2);
        assert_eq!(r.device_count(UNMAPPED_MMIO), 1);
        assert_eq!(r.device_count("virtio-9p"), 0);
        let table = r.to_string();
        assert!(
            table.contains("io-out") && table.contains("serial"),
            "{table}"
        );
        let serial_line = table.lines().find(|l| l.starts_with("serial")).unwrap();
        assert!(
            serial_line.contains(" 200"),
            "average of 300 and 100 ns: {serial_line}"
        );
    }
}
