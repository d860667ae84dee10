//! `bootbox run` and `bootbox boot`: turn arguments into a VM (kernel, initrd parts, devices,
//! shares), run it with Ctrl-C handling, and turn the outcome into an exit code and a report.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use appliance::{ApplianceSpec, Job, ShareMount};
use vmm::devices::virtio::VirtioConsole;
use vmm::phases::PhaseLog;
use vmm::vm::{ConsoleSink, GuestExit, InitrdPart, RunOutcome, Vm, VmConfig};

use crate::args::{BootArgs, InitrdArgs, JobArgs, RunArgs, VmArgs};
use crate::failure::{fail, Failure};
use crate::ninep::{add_shares, ShareServers};
use crate::overlap::refuse_overlaps;
use crate::report::{vmm_peak_rss_kib, Phase, RunRecord};
use crate::share::{dedupe_tags, Share};
use crate::signals::Signals;
use crate::warm::{warm_machine, Machine, WarmRequest};
use crate::{kernel, EXIT_INTERRUPTED, EXIT_LAUNCHER, EXIT_TIMEOUT};

/// The kernel command line the appliance boots with. `quiet` keeps the slow UART out of the
/// boot path; panics still print (they are above the quiet level).
pub const APPLIANCE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet rdinit=/init tsc=reliable no_timer_check";

/// The parsed shares, checked as a set: derived tags made unique, overlaps refused.
fn checked_shares(mut shares: Vec<Share>) -> Result<Vec<Share>, Failure> {
    dedupe_tags(&mut shares)?;
    refuse_overlaps(&shares)?;
    for s in &shares {
        let mode = if s.read_only {
            "read-only"
        } else {
            "read-write"
        };
        log::info!("share {} as tag '{}', {mode}", s.dir.display(), s.tag);
    }
    Ok(shares)
}

/// A writer on a duplicate of one of our standard descriptors (unbuffered: every chain the
/// guest sends is written through at once, in order).
fn std_writer(fd: std::os::fd::BorrowedFd<'_>) -> Result<Box<dyn Write + Send>, Failure> {
    let owned: OwnedFd = fd.try_clone_to_owned()?;
    Ok(Box::new(File::from(owned)))
}

/// `--timeout` as a duration; checked before anything expensive happens.
fn vm_timeout(a: &VmArgs) -> Result<Option<Duration>, Failure> {
    match a.timeout {
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(fail(format!(
            "--timeout {t}: give a positive number of seconds"
        ))),
        None => Ok(None),
    }
}

/// How rw shares treat a guest's chown: mapped unless `--passthrough-ownership`.
fn ownership_mode(a: &VmArgs) -> p9::Ownership {
    if a.passthrough_ownership {
        p9::Ownership::Passthrough
    } else {
        p9::Ownership::Mapped
    }
}

/// The environment variable that makes cold boots the default (`1`); `--warm` still wins.
const COLD_ENV: &str = "BOOTBOX_COLD";

/// Whether the user asked for a cold boot: `--cold`, or BOOTBOX_COLD=1 without `--warm`.
fn wants_cold(a: &RunArgs) -> bool {
    a.cold || (!a.warm && std::env::var_os(COLD_ENV).is_some_and(|v| v == "1"))
}

/// Whether this run needs what a resumed appliance cannot give: disks (virtio-mmio has no
/// hotplug, and the snapshot holds consoles and share slots only), or the kernel's console
/// (`--console`: the kernel booted when the snapshot was made).
fn warm_needs_cold(a: &RunArgs) -> bool {
    if !a.job.disks.is_empty() {
        log::info!("warm start: disks are attached, so this run boots cold");
        return true;
    }
    if a.console {
        log::info!("warm start: --console shows the kernel booting, so this run boots cold");
        return true;
    }
    false
}

/// `--passthrough-ownership` is for root: only root can give a host file to another owner.
fn check_ownership_mode(a: &VmArgs) -> Result<(), Failure> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if a.passthrough_ownership && unsafe { libc::geteuid() } != 0 {
        return Err(fail(
            "--passthrough-ownership needs root (only root can give host files to other owners); \
             without it a guest's ownership is kept in an extended attribute"
                .to_string(),
        ));
    }
    Ok(())
}

fn vm_config(kernel: PathBuf, cmdline: String, a: &VmArgs) -> Result<VmConfig, Failure> {
    let timeout = vm_timeout(a)?;
    let mut cmdline = cmdline;
    if let Some(extra) = &a.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut c = VmConfig::new(kernel, cmdline);
    c.mem_mib = a.mem;
    c.vcpus = a.vcpus;
    c.timeout = timeout;
    c.stats = a.stats;
    Ok(c)
}

/// The whole `--stats` report: VM exits and device time, virtio devices, 9p requests.
fn stats_report(outcome: &RunOutcome, shares: &ShareServers) -> Option<String> {
    let exits = outcome.stats.as_ref()?;
    let mut out = format!("{exits}");
    if !outcome.virtio_stats.is_empty() {
        out.push_str("virtio devices:\n");
        for v in &outcome.virtio_stats {
            out.push_str(&format!("  {v}\n"));
        }
    }
    out.push_str(&shares.report());
    Some(out)
}

/// Runs a prepared VM with Ctrl-C handling and builds the record.
fn execute(
    vm: Machine,
    signals: Signals,
    phases: &PhaseLog,
    shares: &ShareServers,
    what: &str,
) -> Result<(RunOutcome, RunRecord), Failure> {
    let console = vm.console_handle();
    signals.watch(vm.stop_handle());
    let outcome = match vm.run() {
        Ok(o) => o,
        Err(e) => {
            let tail = console.tail();
            // A kernel the VMM cannot load is the user's file, not the guest's doing.
            let mut message = match e {
                vmm::VmError::BadKernel { .. } => e.to_string(),
                _ => format!("{what}: {e}"),
            };
            if !tail.is_empty() {
                message.push_str("\nlast console lines:\n");
                for l in tail.iter().rev().take(20).rev() {
                    message.push_str("  ");
                    message.push_str(l);
                    message.push('\n');
                }
            }
            return Err(fail(message));
        }
    };
    // A device that panicked was stopped; the guest may have gone on without it.
    for report in &outcome.device_panics {
        eprintln!("bootbox: {report}");
    }
    let record = RunRecord {
        outcome: match outcome.exit {
            GuestExit::Status(_) => "status",
            GuestExit::Reset => "reset",
            GuestExit::Timeout => "timeout",
            GuestExit::Stopped => "stopped",
        }
        .into(),
        kvm_hardware: outcome.kvm_hardware,
        phases: std::iter::once(Phase {
            name: "process start".into(),
            start_ns: 0,
            guest: false,
        })
        .chain(phases.events().into_iter().map(|e| Phase {
            name: e.name.into_owned(),
            start_ns: e.nanos,
            guest: e.guest,
        }))
        .collect(),
        vmm_peak_rss_kib: vmm_peak_rss_kib(outcome.guest_resident_kib),
        stats: stats_report(&outcome, shares),
        page_faults: crate::report::page_faults(),
        guest_resident_kib: outcome.guest_resident_kib,
        ..Default::default()
    };
    Ok((outcome, record))
}

fn finish(mut record: RunRecord, code: u8, a: &VmArgs) -> u8 {
    record.exit_code = code;
    if a.phases {
        eprint!("{}", record.table());
    }
    if let Some(s) = &record.stats {
        eprint!("{s}");
    }
    if let Some(path) = &a.json {
        if let Err(e) = record.write_json(path) {
            eprintln!("bootbox: cannot write {}: {e}", path.display());
            return EXIT_LAUNCHER;
        }
    }
    code
}

fn report_failure(f: Failure) -> u8 {
    eprintln!("bootbox: {}", f.message);
    f.code
}

/// Blocks the stop signals before any thread starts, runs `body`, and reports a failure.
fn launch(body: impl FnOnce(Signals) -> Result<u8, Failure>) -> u8 {
    body(Signals::block()).unwrap_or_else(report_failure)
}

/// `bootbox run`.
pub fn run(process_start: Instant, a: RunArgs) -> u8 {
    launch(|signals| run_inner(process_start, a, signals))
}

fn run_inner(process_start: Instant, a: RunArgs, signals: Signals) -> Result<u8, Failure> {
    let phases = PhaseLog::new(process_start);
    vm_timeout(&a.vm)?;
    check_ownership_mode(&a.vm)?;
    let shares = checked_job_inputs(&a.job)?;
    let env = a
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(fail(format!("--env {kv}: expected NAME=VALUE"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kernel = kernel::find(a.vm.kernel.as_deref())?;
    log::info!("using kernel {}", kernel.display());
    // Everything cheap is checked before the appliance is built.
    let mut config = vm_config(kernel, APPLIANCE_CMDLINE.to_string(), &a.vm)?;
    config.check()?;
    let (prepared, job) =
        appliance_and_job(&shares, &a.job, env, a.workdir.clone(), a.command.clone())?;
    phases.record("appliance ready");
    signals.check("building the appliance")?;
    let job_cpio = appliance::job_cpio(&job)?;

    let interactive = a.command.is_empty();
    config.initrd = vec![
        InitrdPart::File(prepared.path.clone()),
        InitrdPart::Bytes(job_cpio),
    ];
    // The interactive shell talks through the serial console on the terminal; otherwise the
    // kernel's console is diagnostics and never mixes into the job's stdout.
    config.console = if interactive {
        ConsoleSink::Stdout
    } else if a.console {
        ConsoleSink::Stderr
    } else {
        ConsoleSink::Off
    };
    config.stdin = interactive;
    if interactive || a.console {
        // The shell talks through the serial console, and --console asks to see the kernel's
        // messages: the kernel must not be quiet then.
        config.cmdline = config.cmdline.replace(" quiet", "");
    }
    // Held until the run ends: the block devices' workers.
    let mut _block_pool = None;
    let request = WarmRequest {
        cold: wants_cold(&a) || warm_needs_cold(&a),
        ownership: ownership_mode(&a.vm),
        config: &config,
        prepared: &prepared,
        job: &job,
        shares: &shares,
        phases: &phases,
        signals,
        stdout: VirtioConsole::new(std_writer(std::io::stdout().as_fd())?),
        stderr: VirtioConsole::new(std_writer(std::io::stderr().as_fd())?),
    };
    let warm = warm_machine(request, |c| confine(&a.vm, c, &shares))?;
    let (machine, servers) = match warm {
        Some(warm) => warm,
        None => {
            let mut vm = confined_vm(&a.vm, config, &phases, &shares)?;
            // Order matters: the guest numbers consoles in probe order, so hvc0 = stdout,
            // hvc1 = stderr.
            vm.add_virtio_device(
                "virtio-console (stdout)",
                Box::new(VirtioConsole::new(std_writer(std::io::stdout().as_fd())?)),
            )?;
            vm.add_virtio_device(
                "virtio-console (stderr)",
                Box::new(VirtioConsole::new(std_writer(std::io::stderr().as_fd())?)),
            )?;
            let servers = add_shares(&mut vm, &shares, ownership_mode(&a.vm))?;
            // After the consoles and shares: only block devices get /dev/vdX names, in this
            // order.
            _block_pool = Some(crate::disk::attach(&mut vm, &a.job.disks)?);
            (Machine::Cold(vm), servers)
        }
    };

    let (outcome, mut record) = execute(machine, signals, &phases, &servers, "the appliance")?;
    record.appliance_built = Some(prepared.built);
    let code = match outcome.exit {
        GuestExit::Status(s) => s,
        GuestExit::Timeout => {
            eprintln!(
                "bootbox: the job did not finish within {}s; the VM was stopped",
                a.vm.timeout.unwrap_or_default()
            );
            EXIT_TIMEOUT
        }
        GuestExit::Stopped => {
            eprintln!("bootbox: interrupted; the VM was stopped");
            EXIT_INTERRUPTED
        }
        GuestExit::Reset => {
            eprintln!("bootbox: the appliance rebooted without reporting the job's status (a guest kernel panic?)");
            if !outcome.console_tail.is_empty() {
                eprintln!("last console lines:");
                for l in &outcome.console_tail {
                    eprintln!("  {l}");
                }
            }
            EXIT_LAUNCHER
        }
    };
    Ok(finish(record, code, &a.vm))
}

/// The job's shares (checked for overlap) and disks (checked for count and format): the
/// cheap checks, made before the appliance is built.
fn checked_job_inputs(j: &JobArgs) -> Result<Vec<Share>, Failure> {
    let shares = checked_shares(j.shares.clone())?;
    crate::disk::check_disks(&j.disks, shares.len())?;
    Ok(shares)
}

/// The appliance (built or from the cache, with `j.with`) and the job it runs: command,
/// environment, working directory, share mounts and disks.
fn appliance_and_job(
    shares: &[Share],
    j: &JobArgs,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    argv: Vec<std::ffi::OsString>,
) -> Result<(appliance::Prepared, Job), Failure> {
    use std::os::unix::ffi::OsStringExt;
    let argv: Vec<Vec<u8>> = argv.into_iter().map(OsStringExt::into_vec).collect();
    let spec = ApplianceSpec {
        init: appliance::find_init()?,
        extra_programs: j.with.clone(),
        disk_tools: !j.disks.is_empty(),
        cache_dir: appliance::default_cache_dir()?,
    };
    let prepared = appliance::prepare(&spec)?;
    log::info!(
        "appliance {} ({} KiB, {} in {:.0?})",
        prepared.path.display(),
        prepared.size / 1024,
        if prepared.built { "built" } else { "cached" },
        prepared.build_time
    );
    let mounts: Vec<ShareMount> = shares
        .iter()
        .map(|s| ShareMount {
            tag: s.tag.clone(),
            mount_point: appliance::default_mount_point(&s.tag, shares.len()),
            read_only: s.read_only,
        })
        .collect();
    let cwd = workdir.or_else(|| (shares.len() == 1).then(|| "/share".to_string()));
    Ok((
        prepared,
        Job {
            argv,
            env,
            cwd,
            shares: mounts,
            disks: crate::disk::attachments(&j.disks),
            mount_disks: j.mount_disks,
        },
    ))
}

/// `bootbox initrd`.
pub fn initrd(a: InitrdArgs) -> u8 {
    let result = (|| -> Result<(), Failure> {
        let shares = checked_job_inputs(&a.job)?;
        let (prepared, job) =
            appliance_and_job(&shares, &a.job, Vec::new(), None, a.command.clone())?;
        let bytes = appliance::initramfs(&prepared, &job)?;
        std::fs::write(&a.output, bytes)
            .map_err(|e| fail(format!("cannot write {}: {e}", a.output.display())))?;
        for s in &shares {
            println!(
                "share {} tag {} {}",
                s.dir.display(),
                s.tag,
                if s.read_only { "ro" } else { "rw" }
            );
        }
        crate::disk::print_attachments(&a.job.disks);
        Ok(())
    })();
    match result {
        Ok(()) => 0,
        Err(f) => report_failure(f),
    }
}

/// `bootbox boot`.
pub fn boot(process_start: Instant, a: BootArgs) -> u8 {
    launch(|signals| boot_inner(process_start, a, signals))
}

fn boot_inner(process_start: Instant, a: BootArgs, signals: Signals) -> Result<u8, Failure> {
    let phases = PhaseLog::new(process_start);
    vm_timeout(&a.vm)?;
    check_ownership_mode(&a.vm)?;
    let shares = checked_shares(a.shares.clone())?;
    let kernel = kernel::find(a.vm.kernel.as_deref())?;
    log::info!("using kernel {}", kernel.display());
    for i in &a.initrd {
        if !i.is_file() {
            return Err(fail(format!("--initrd {}: no such file", i.display())));
        }
    }
    let mut config = vm_config(kernel, a.cmdline.clone(), &a.vm)?;
    config.check()?;
    config.initrd = a.initrd.iter().cloned().map(InitrdPart::File).collect();
    config.console = ConsoleSink::Stdout;
    config.stdin = !a.no_stdin;
    let mut vm = confined_vm(&a.vm, config, &phases, &shares)?;
    let servers = add_shares(&mut vm, &shares, ownership_mode(&a.vm))?;
    let (outcome, record) = execute(Machine::Cold(vm), signals, &phases, &servers, "the guest")?;
    let code = match outcome.exit {
        GuestExit::Status(s) => s,
        GuestExit::Reset => 0,
        GuestExit::Timeout => {
            eprintln!(
                "bootbox: the guest did not finish within {}s; it was stopped",
                a.vm.timeout.unwrap_or_default()
            );
            EXIT_TIMEOUT
        }
        GuestExit::Stopped => EXIT_INTERRUPTED,
    };
    let _ = std::io::stdout().flush();
    Ok(finish(record, code, &a.vm))
}

/// Confines the process and creates the VM (whose config carries the one `--stats` switch).
fn confined_vm(
    a: &VmArgs,
    config: VmConfig,
    phases: &PhaseLog,
    shares: &[Share],
) -> Result<Vm, Failure> {
    confine(a, &config, shares)?;
    Ok(Vm::new(config, phases.clone())?)
}

// ---- Confinement (see vmm::sandbox) -------------------------------------------------------------

/// Confines the process before the VM exists and before any thread starts (Landlock binds the
/// threads created afterwards): from here on it may read only the kernel, the initrd files and
/// the shares, write only the writable shares and the `--json` report, and open /dev/kvm; each
/// thread then takes its seccomp role. Says once when the kernel lacks a part and goes on;
/// `--no-sandbox` skips it all.
fn confine(a: &VmArgs, config: &VmConfig, shares: &[Share]) -> Result<(), Failure> {
    use vmm::sandbox::Policy;
    if a.no_sandbox {
        return Ok(());
    }
    let mut policy = Policy::new()
        .seccomp(!a.no_seccomp)
        .passthrough_ownership(a.passthrough_ownership)
        .read_file(&config.kernel);
    for part in &config.initrd {
        if let InitrdPart::File(path) = part {
            policy = policy.read_file(path);
        }
    }
    for s in shares {
        policy = policy.share(&s.dir, !s.read_only);
    }
    // Disk images need no rule: they were opened while parsing (see crate::disk).
    if let Some(json) = &a.json {
        // Written after the run; it must exist now for the policy to name it.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(json)
            .map_err(|e| fail(format!("--json {}: {e}", json.display())))?;
        policy = policy.write_file(json);
    }
    let report = vmm::sandbox::install(&policy)?;
    match report.shortfall() {
        Some(line) => log::warn!("{line}"),
        None => log::info!("the monitor is confined (see --no-sandbox)"),
    }
    Ok(())
}

// ---- End of confinement -------------------------------------------------------------------------
