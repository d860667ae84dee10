//! The `bootbox` command line: `run` (the appliance), `boot` (a bare kernel), `bench`,
//! `doctor`, `initrd`. This file parses the arguments, sets the process up and dispatches;
//! errors from every layer are turned into one message and an exit code.
//!
//! Exit codes follow `env`/`docker run`: the job's own status when it ran; 124 on timeout;
//! 125 when bootbox itself failed; 126/127 when the job's command could not be run (reported
//! by the guest init); 130 on Ctrl-C.

mod args;
mod bench;
mod cache_cmd;
mod disk;
mod doctor;
mod failure;
mod kernel;
mod launch;
mod logger;
mod ninep;
mod overlap;
mod report;
mod share;
mod signals;
mod warm;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use args::{Cli, Command};

/// Exit code when bootbox itself failed (bad arguments, no KVM, missing kernel...).
pub const EXIT_LAUNCHER: u8 = 125;
/// Exit code when the job ran out of time.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit code after Ctrl-C / SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors; bad usage is a launcher error (125), as with
        // `env` and `docker run`.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_LAUNCHER } else { 0 });
        }
    };
    logger::install(cli.verbose);
    raise_fd_limit();
    let code = match cli.command {
        Command::Run(a) => launch::run(process_start, a),
        Command::Boot(a) => launch::boot(process_start, a),
        Command::Bench(a) => bench::bench(a),
        Command::Doctor(a) => doctor::doctor(a),
        Command::Initrd(a) => launch::initrd(a),
        Command::Cache { action } => cache_cmd::cache(action),
    };
    ExitCode::from(code)
}

/// Every 9p fid holds an O_PATH descriptor on the host, and a guest walking a large tree with
/// metadata caching keeps a fid per cached dentry, so the default soft limit (often 1024) is far
/// too low. Raise the soft limit to the hard limit, and as root the hard limit towards the
/// kernel's `fs.nr_open` (capped at 1 Mi). The 9p server sizes its fid limits from the result.
fn raise_fd_limit() {
    const WANT: libc::rlim_t = 1 << 20;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(lim.rlim_max);
        let hard = lim.rlim_max.max(WANT.min(nr_open));
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not allowed to raise the hard limit: take what the hard limit allows.
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            log::debug!("open file limit: {} (hard {})", lim.rlim_cur, lim.rlim_max);
        }
    }
}
