//! The command-line grammar (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::disk::{parse_disk, Disk, DISK_GRAMMAR, DISK_HELP};
use crate::share::{parse_share, Share, SHARE_GRAMMAR};

/// What `--help` says about `--share`, the same for every subcommand.
const SHARE_HELP: &str = "Share a host directory: DIR[:TAG][:ro|rw], read-only unless :rw. \
    TAG (default: the directory's name) is 1 to 36 letters, digits, '_', '-' or '.'. \
    Write a ':' in DIR as '\\:' (and a '\\' just before a ':' as '\\\\'). \
    Give it several times for several shares; `run` mounts one share at /share, several at \
    /share/TAG";

#[derive(Parser, Debug)]
#[command(
    name = "bootbox",
    version,
    about = "Run filesystem inspection jobs in a disposable KVM micro-VM appliance",
    long_about = "bootbox boots a tiny Linux appliance in its own KVM monitor, shares host \
                  directories with it over virtio-9p (read-only by default), runs a command \
                  inside, streams its output back and exits with its status.\n\n\
                  Example: bootbox run --share ./tree -- find /share -type f"
)]
pub struct Cli {
    /// Say more on stderr: -v what bootbox does, -vv device and 9p debugging, -vvv
    /// everything. Default: warnings and errors only (see also BOOTBOX_LOG).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run COMMAND inside the appliance with the given shares mounted (no COMMAND: a shell).
    Run(RunArgs),
    /// Boot a kernel and initrd directly (no appliance); exits with the guest's status.
    Boot(BootArgs),
    /// Boot many times and print per-phase statistics (optionally against another command).
    Bench(BenchArgs),
    /// Check KVM access, the guest kernel and the appliance cache, and say what to fix.
    Doctor(DoctorArgs),
    /// Write the initramfs `run` would boot (cached appliance + job) to a file, e.g. to boot
    /// the same appliance under another VMM for comparison.
    Initrd(InitrdArgs),
    /// List or remove the cached appliances and warm-start snapshots.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
}

/// What `bootbox cache` does.
#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum CacheAction {
    /// Show each cached appliance and snapshot with its key and size.
    List,
    /// Remove every cached appliance and snapshot.
    Clear,
}

#[derive(Args, Debug, Clone)]
pub struct InitrdArgs {
    /// Where to write the initramfs.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// The job's shares, disks and extra programs, as for `run` (the share tags and the disks
    /// are printed: give the other VMM the same tags, and the same disks in the same order).
    #[command(flatten)]
    pub job: JobArgs,
    /// The job's command (any bytes: file names need not be UTF-8).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// What the appliance carries for a job: the same options and grammar for `run` and `initrd`.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Share a host directory: DIR[:TAG][:ro|rw] (read-only unless :rw). One share is mounted
    /// at /share, several at /share/TAG.
    #[arg(long = "share", value_name = SHARE_GRAMMAR, value_parser = parse_share, long_help = SHARE_HELP)]
    pub shares: Vec<Share>,
    /// Attach a disk image as /dev/vda, /dev/vdb, ... (read-only unless :rw; qcow2 or raw,
    /// found from the content unless named).
    #[arg(long = "disk", value_name = DISK_GRAMMAR, value_parser = parse_disk, long_help = DISK_HELP)]
    pub disks: Vec<Disk>,
    /// Mount every recognised filesystem on the disks (whole disks and partitions) read-only
    /// under /disk/<device> (e.g. /disk/vda, /disk/vda1) before the job starts.
    #[arg(long)]
    pub mount_disks: bool,
    /// Add a host program (and its libraries) to the appliance.
    #[arg(long = "with", value_name = "PROGRAM")]
    pub with: Vec<String>,
}

/// Options shared by `run` and `boot`.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest kernel (ELF vmlinux or bzImage). Default: $BOOTBOX_KERNEL, else the newest kernel
    /// built by scripts/build-kernel.sh in the cache.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// Print the boot phase table on stderr when the VM ends.
    #[arg(long)]
    pub phases: bool,
    /// Write the run record (phases, exit, stats) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Count VM exits, device service time and 9p requests, and print them at the end.
    #[arg(long)]
    pub stats: bool,
    /// Extra kernel command-line arguments.
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Run the monitor unconfined (no Landlock, seccomp or no_new_privs), for debugging.
    #[arg(long)]
    pub no_sandbox: bool,
    /// On rw shares, apply the guest's chown to the host files (root only). By default a
    /// guest's owner, group, set-id bits and device nodes live in an extended attribute and
    /// every host file stays the invoking user's (see README: what a guest can reach).
    #[arg(long)]
    pub passthrough_ownership: bool,
    /// Leave out the per-thread seccomp system call allowlists (Landlock and no_new_privs
    /// stay), for debugging a refused call.
    #[arg(long, conflicts_with = "no_sandbox")]
    pub no_seccomp: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Set an environment variable for the job (NAME=VALUE).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the job inside the guest (default: /share when there is one share).
    #[arg(long)]
    pub workdir: Option<String>,
    /// Show the guest kernel's console on stderr.
    #[arg(long)]
    pub console: bool,
    /// Resume the appliance from its warm-start snapshot (made by the first such run of this
    /// shape) instead of booting the kernel: the default, unless BOOTBOX_COLD=1.
    #[arg(long, conflicts_with = "cold")]
    pub warm: bool,
    /// Boot the kernel for this job instead of resuming a snapshot (BOOTBOX_COLD=1 makes this
    /// the default; `--warm` overrides it).
    #[arg(long)]
    pub cold: bool,
    #[command(flatten)]
    pub vm: VmArgs,
    /// The command to run inside the appliance, and its arguments (any bytes: file names need
    /// not be UTF-8).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Args, Debug, Clone)]
pub struct BootArgs {
    /// Initrd (cpio); give it several times to concatenate archives.
    #[arg(long)]
    pub initrd: Vec<PathBuf>,
    /// Kernel command line (console=ttyS0 and virtio devices are added as needed).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// Share a host directory with the guest: DIR[:TAG][:ro|rw] (read-only unless :rw), as
    /// for `run`; the guest mounts it by TAG.
    #[arg(long = "share", value_name = SHARE_GRAMMAR, value_parser = parse_share, long_help = SHARE_HELP)]
    pub shares: Vec<Share>,
    /// Do not forward the host's stdin to the serial port.
    #[arg(long)]
    pub no_stdin: bool,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Measured runs (at least 1).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Unmeasured warm-up runs first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// A second command line to time, interleaved A B A B (e.g. QEMU microvm with the same
    /// kernel and initrd). A shell command string; `{json}` in it becomes a path for a
    /// bootbox run's `--json`, so that side's phases and memory are compared too.
    #[arg(long, value_name = "SHELL-COMMAND")]
    pub compare: Option<String>,
    /// Write all samples and the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Boot with initcall_debug, collect the kernel log and list the slowest initcalls.
    #[arg(long)]
    pub analyze: bool,
    /// The exit status a successful run of the benchmarked bootbox command has (a non-zero
    /// status lets a comparison VMM's run prove the job itself succeeded).
    #[arg(long, default_value_t = 0)]
    pub expect_status: i32,
    /// Attach a disk to every benchmarked run (added to the `run` arguments; checked here
    /// first, as for `run`).
    #[arg(long = "disk", value_name = DISK_GRAMMAR, value_parser = parse_disk, long_help = DISK_HELP)]
    pub disks: Vec<Disk>,
    /// How many of the slowest initcalls to list with --analyze.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
    /// The bootbox arguments to benchmark, e.g. `run --share . -- true` (default: `run -- true`).
    #[arg(last = true, value_name = "BOOTBOX-ARGS")]
    pub target: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Build the guest kernel if it is missing (runs scripts/build-kernel.sh).
    #[arg(long)]
    pub fix: bool,
}
