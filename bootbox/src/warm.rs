//! Warm start for `bootbox run`: instead of booting a kernel, resume the appliance from a
//! snapshot taken where its init waits for its job, and hand it the job through the job port
//! (see `guest_abi::warm`).
//!
//! The snapshot is keyed by everything the resumed guest depends on: the kernel (path, size,
//! inode, modification and change times), the appliance's content key, memory, vCPUs, the
//! command line, the device set (two consoles, [`SHARE_SLOTS`] 9p slots, the job port) and the
//! snapshot and job-channel format versions. It lives in `<cache>/snapshot/<key>.snap`; the
//! first run of a shape makes it (boots the appliance to its wait point, with no share and no
//! job byte in the guest, before the process confines itself) under an exclusive `flock` on
//! `<cache>/snapshot/.lock`, so concurrent runs make it once, and the file is published
//! atomically. Every later run validates it (header, key, size, checksum, state) before any
//! guest code runs; an unusable one is reported in one line, removed and the job boots cold
//! (the next run makes a new one). `--cold`, an interactive shell and a job with more shares
//! than slots boot cold.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use appliance::{Job, Prepared};
use guest_abi::warm::{slot_tag, WarmJob, SEED_LEN, SHARE_SLOTS, WARM_VERSION, WARM_WAIT_PATH};
use vmm::devices::virtio::{Virtio9p, VirtioConsole};
use vmm::phases::PhaseLog;
use vmm::snapshot::{self, SnapshotFile, SnapshotKey};
use vmm::vm::{
    ConsoleHandle, ConsoleSink, InitrdPart, ReadyVm, RunOutcome, StopHandle, Vm, VmConfig,
};

use crate::failure::{fail, Failure};
use crate::ninep::{self, ShareServers};
use crate::share::Share;
use crate::signals::{interrupted, Signals};
use crate::EXIT_INTERRUPTED;

/// How long the snapshot-making boot may take before it is abandoned (and the job boots cold).
const SNAPSHOT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// The snapshot directory under the cache root.
const SNAPSHOT_DIR: &str = "snapshot";

/// A VM ready to run: booting a kernel, or resumed from a snapshot.
pub enum Machine {
    Cold(Vm),
    Warm(ReadyVm),
}

impl Machine {
    pub fn stop_handle(&self) -> StopHandle {
        match self {
            Machine::Cold(vm) => vm.stop_handle(),
            Machine::Warm(ready) => ready.vm().stop_handle(),
        }
    }

    pub fn console_handle(&self) -> ConsoleHandle {
        match self {
            Machine::Cold(vm) => vm.console_handle(),
            Machine::Warm(ready) => ready.vm().console_handle(),
        }
    }

    pub fn run(self) -> Result<RunOutcome, vmm::VmError> {
        match self {
            Machine::Cold(vm) => vm.run(),
            Machine::Warm(ready) => ready.run(),
        }
    }
}

/// Why a job does not run warm, or `None` when it can.
fn cold_reason(cold_flag: bool, job: &Job, share_count: usize) -> Option<Option<String>> {
    if cold_flag || job.argv.is_empty() {
        return Some(None); // asked for, or an interactive shell: nothing to say
    }
    if share_count > SHARE_SLOTS {
        return Some(Some(format!(
            "{share_count} shares exceed the {SHARE_SLOTS} share slots of a warm appliance; booting cold"
        )));
    }
    None
}

/// The snapshot key of a shape (see the module docs).
pub fn snapshot_key(kernel: &Path, appliance_key: &str, config: &VmConfig) -> SnapshotKey {
    let mut h = appliance::sha256::Sha256::new();
    h.field(b"bootbox warm start");
    h.field(&snapshot::format::FORMAT_VERSION.to_le_bytes());
    h.field(&WARM_VERSION.to_le_bytes());
    h.field(kernel.as_os_str().as_encoded_bytes());
    if let Ok(m) = std::fs::metadata(kernel) {
        for v in [m.dev(), m.ino(), m.size()] {
            h.field(&v.to_le_bytes());
        }
        for v in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
            h.field(&v.to_le_bytes());
        }
    }
    h.field(appliance_key.as_bytes());
    h.field(&config.mem_mib.to_le_bytes());
    h.field(&[config.vcpus]);
    h.field(config.cmdline.as_bytes());
    h.field(format!("console,console,9p*{SHARE_SLOTS},job-port").as_bytes());
    h.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the snapshots live.
pub fn snapshot_dir(cache_root: &Path) -> PathBuf {
    cache_root.join(SNAPSHOT_DIR)
}

/// The initramfs part that makes the init wait for its job on the job port.
fn warm_wait_cpio() -> Result<Vec<u8>, Failure> {
    let mut w = appliance::cpio::CpioWriter::new(Vec::new());
    w.add_dir("bootbox", 0o755)?;
    w.add_bytes(WARM_WAIT_PATH.trim_start_matches('/'), 0o644, b"")?;
    Ok(w.finish()?)
}

/// Adds the devices every warm appliance has, in this order: the stdout and stderr consoles,
/// then one 9p device per share slot (`shares` in the first slots, unbacked ones after).
fn add_warm_devices(
    vm: &mut Vm,
    stdout: VirtioConsole,
    stderr: VirtioConsole,
    shares: &[Share],
    ownership: p9::Ownership,
) -> Result<ShareServers, Failure> {
    vm.add_virtio_device("virtio-console (stdout)", Box::new(stdout))?;
    vm.add_virtio_device("virtio-console (stderr)", Box::new(stderr))?;
    let slotted: Vec<Share> = shares
        .iter()
        .enumerate()
        .map(|(i, s)| Share {
            tag: slot_tag(i),
            ..s.clone()
        })
        .collect();
    let servers = ninep::add_shares(vm, &slotted, ownership)?;
    let pool = match &servers.pool {
        Some(pool) => pool.clone(),
        None => Arc::new(p9::WorkerPool::new(1, "9p-slot")),
    };
    for slot in shares.len()..SHARE_SLOTS {
        let dev = Virtio9p::unbacked(&slot_tag(slot), pool.clone())?;
        vm.add_virtio_device("virtio-9p", Box::new(dev))?;
    }
    Ok(servers)
}

fn discard() -> VirtioConsole {
    VirtioConsole::new(Box::new(std::io::sink()))
}

/// Boots the appliance to its wait point and writes the snapshot (the caller holds the lock).
fn make_snapshot(
    config: &VmConfig,
    appliance: &Path,
    path: &Path,
    key: &SnapshotKey,
    signals: Signals,
) -> Result<(), Failure> {
    let mut c = config.clone();
    c.initrd = vec![
        InitrdPart::File(appliance.to_path_buf()),
        InitrdPart::Bytes(warm_wait_cpio()?),
    ];
    c.console = ConsoleSink::Off;
    c.stdin = false;
    c.timeout = Some(SNAPSHOT_BOOT_TIMEOUT);
    c.stats = false;
    let mut vm = Vm::new(c, PhaseLog::new(std::time::Instant::now()))?;
    add_warm_devices(&mut vm, discard(), discard(), &[], p9::Ownership::Mapped)?;
    let point = vm.add_job_port_for_snapshot()?;
    let stop = vm.stop_handle();
    let loaded = vm.load()?;
    let (made, interrupted_now) = signals.during(stop, || loaded.run_to_snapshot(point, path, key));
    if interrupted_now {
        // A snapshot completed before the signal was taken stays: it is whole and published.
        return Err(interrupted("making the warm-start snapshot"));
    }
    Ok(made?)
}

/// How often a run waiting for another run's snapshot looks for Ctrl-C.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// Takes the exclusive lock of `dir` (held until the returned file is dropped), waiting for
/// another run that holds it; a stop signal ends the wait.
fn lock_dir(dir: &Path, signals: Signals) -> Result<File, Failure> {
    let err = |what: &str, e: std::io::Error| {
        fail(format!(
            "snapshot cache: {what} {}: {e}; check permissions of the cache directory or set BOOTBOX_CACHE",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| err("creating", e))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(|e| err("opening the lock in", e))?;
    loop {
        // SAFETY: flock on an open, owned descriptor; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err("locking", e));
        }
        signals.check("waiting for another run's warm-start snapshot")?;
        std::thread::sleep(LOCK_POLL);
    }
}

/// Reads and validates the snapshot at `path`; an unusable one is reported, removed, and
/// `None` returned (the job then boots cold).
fn open_snapshot(path: &Path, key: &SnapshotKey) -> Option<SnapshotFile> {
    match snapshot::read_snapshot(path, key) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!(
                "bootbox: warm-start snapshot {} is unusable ({e}); removed it, booting cold \
                 (the next run makes a new one)",
                path.display()
            );
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// The snapshot for this shape, made first if there is none. `None` (with one line on stderr
/// saying why) when it cannot be made or read: the job then boots cold.
fn ready_snapshot(
    config: &VmConfig,
    prepared: &Prepared,
    cache_root: &Path,
    signals: Signals,
) -> Result<Option<SnapshotFile>, Failure> {
    let key = snapshot_key(&config.kernel, &prepared.key, config);
    let dir = snapshot_dir(cache_root);
    let path = dir.join(format!("{}.snap", hex(&key)));
    if !path.is_file() {
        let _lock = lock_dir(&dir, signals)?;
        if !path.is_file() {
            log::info!("making the warm-start snapshot {}", path.display());
            if let Err(f) = make_snapshot(config, &prepared.path, &path, &key, signals) {
                if f.code == EXIT_INTERRUPTED {
                    return Err(f);
                }
                eprintln!(
                    "bootbox: cannot make the warm-start snapshot ({}); booting cold",
                    f.message.replace('\n', " ")
                );
                return Ok(None);
            }
        }
    }
    Ok(open_snapshot(&path, &key))
}

/// Fresh random bytes from the host kernel (getrandom(2): no file to open, so it works in the
/// confined process too).
fn random_seed() -> Result<[u8; SEED_LEN], Failure> {
    let mut seed = [0u8; SEED_LEN];
    let mut filled = 0;
    while filled < SEED_LEN {
        let rest = &mut seed[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into the exclusively borrowed slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(fail(format!("cannot get random bytes for the guest: {e}")));
        }
        filled += n as usize;
    }
    Ok(seed)
}

/// The job message for a resumed guest: the job with its shares renamed to their slots, the
/// host's wall clock now and a fresh seed.
fn warm_job(job: &Job) -> Result<WarmJob, Failure> {
    let mut job = job.clone();
    for (i, s) in job.shares.iter_mut().enumerate() {
        s.tag = slot_tag(i);
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(WarmJob {
        wall_clock_secs: now.as_secs(),
        wall_clock_nanos: now.subsec_nanos(),
        seed: random_seed()?,
        job,
    })
}

/// Everything `bootbox run` has decided before it builds a VM.
pub struct WarmRequest<'a> {
    pub cold: bool,
    /// How the job's rw shares treat a guest's chown.
    pub ownership: p9::Ownership,
    pub config: &'a VmConfig,
    pub prepared: &'a Prepared,
    pub job: &'a Job,
    pub shares: &'a [Share],
    pub phases: &'a PhaseLog,
    /// Ctrl-C while the snapshot is made (or waited for) stops the run with nothing left.
    pub signals: Signals,
    pub stdout: VirtioConsole,
    pub stderr: VirtioConsole,
}

/// The warm machine for this run, or `None` when it boots cold (said on stderr when that was
/// not asked for). `confine` confines the process; it runs after the snapshot exists (making
/// it boots a VM, which must not be confined to the job's files) and before the VM of the job
/// is created.
pub fn warm_machine(
    r: WarmRequest<'_>,
    confine: impl FnOnce(&VmConfig) -> Result<(), Failure>,
) -> Result<Option<(Machine, ShareServers)>, Failure> {
    if let Some(reason) = cold_reason(r.cold, r.job, r.shares.len()) {
        if let Some(line) = reason {
            eprintln!("bootbox: {line}");
        }
        return Ok(None);
    }
    let cache_root = appliance::default_cache_dir()?;
    let Some(snapshot) = ready_snapshot(r.config, r.prepared, &cache_root, r.signals)? else {
        return Ok(None);
    };
    r.phases.record("snapshot opened");
    let mem = match snapshot::map_guest_memory(&snapshot) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bootbox: cannot map the warm-start snapshot ({e}); booting cold");
            return Ok(None);
        }
    };
    r.phases.record("memory mapped");
    let mut config = r.config.clone();
    config.initrd.clear();
    confine(&config)?;
    let mut vm = Vm::with_memory(config, r.phases.clone(), mem)?;
    let servers = add_warm_devices(&mut vm, r.stdout, r.stderr, r.shares, r.ownership)?;
    vm.add_job_port(
        warm_job(r.job)?
            .channel_bytes()
            .map_err(|e| fail(format!("the job cannot be sent: {e}")))?,
    )?;
    let ready = vm.restore(&snapshot.state)?;
    Ok(Some((Machine::Warm(ready), servers)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: &Path) -> VmConfig {
        VmConfig::new(kernel, "console=ttyS0 quiet")
    }

    #[test]
    fn the_key_changes_with_every_part_of_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel one").unwrap();
        let base = snapshot_key(&kernel, "app1", &config(&kernel));
        assert_eq!(base, snapshot_key(&kernel, "app1", &config(&kernel)));
        assert_ne!(base, snapshot_key(&kernel, "app2", &config(&kernel)));
        let mut c = config(&kernel);
        c.mem_mib = 512;
        assert_ne!(base, snapshot_key(&kernel, "app1", &c));
        let mut c = config(&kernel);
        c.vcpus = 2;
        assert_ne!(base, snapshot_key(&kernel, "app1", &c));
        let mut c = config(&kernel);
        c.cmdline.push_str(" extra");
        assert_ne!(base, snapshot_key(&kernel, "app1", &c));
        std::fs::write(&kernel, b"kernel two, longer").unwrap();
        assert_ne!(base, snapshot_key(&kernel, "app1", &config(&kernel)));
    }

    #[test]
    fn too_many_shares_or_an_interactive_job_boot_cold() {
        let job = Job {
            argv: vec![b"true".to_vec()],
            ..Job::default()
        };
        assert_eq!(cold_reason(false, &job, SHARE_SLOTS), None);
        assert_eq!(cold_reason(true, &job, 0), Some(None));
        assert_eq!(cold_reason(false, &Job::default(), 0), Some(None));
        let line = cold_reason(false, &job, SHARE_SLOTS + 1).unwrap().unwrap();
        assert!(
            line.contains("share slots") && line.contains("booting cold"),
            "{line}"
        );
    }

    #[test]
    fn a_damaged_snapshot_is_reported_removed_and_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        let key = [3u8; 32];
        // Garbage, then a plausible prefix cut short: both are caught before anything runs.
        std::fs::write(&path, b"not a snapshot at all").unwrap();
        assert!(open_snapshot(&path, &key).is_none());
        assert!(!path.exists(), "the bad snapshot is removed");
        let mut truncated = b"BOOTBOXS".to_vec();
        truncated.extend_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &truncated).unwrap();
        assert!(open_snapshot(&path, &key).is_none());
        assert!(!path.exists());
    }

    #[test]
    fn the_warm_job_names_slots_and_carries_time_and_seed() {
        let job = Job {
            argv: vec![b"ls".to_vec()],
            shares: vec![
                appliance::ShareMount {
                    tag: "photos".into(),
                    mount_point: "/share/photos".into(),
                    read_only: true,
                },
                appliance::ShareMount {
                    tag: "out".into(),
                    mount_point: "/share/out".into(),
                    read_only: false,
                },
            ],
            ..Job::default()
        };
        let a = warm_job(&job).unwrap();
        let b = warm_job(&job).unwrap();
        let tags: Vec<_> = a.job.shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, [slot_tag(0), slot_tag(1)]);
        assert_eq!(a.job.shares[1].mount_point, "/share/out");
        assert_ne!(a.seed, b.seed, "every job brings a fresh seed");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(a.wall_clock_secs) < 5);
    }
}
