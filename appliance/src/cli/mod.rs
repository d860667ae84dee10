//! Argument parsing and dispatch to the subcommands. Exit codes follow `env`/`docker run`:
//! the job's own status when it ran; 124 on timeout; 125 when bootbox itself failed; 126/127
//! when the job's command could not be run (reported by the guest init); 130 on Ctrl-C.

mod args;
mod bench;
mod doctor;
mod kernel;
mod launch;
mod report;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

pub use args::{Cli, Command};

/// Exit code when bootbox itself failed (bad arguments, no KVM, missing kernel...).
pub const EXIT_LAUNCHER: u8 = 125;
/// Exit code when the job ran out of time.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit code after Ctrl-C / SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

pub fn main(process_start: Instant) -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(a) => launch::run(process_start, a),
        Command::Boot(a) => launch::boot(process_start, a),
        Command::Bench(a) => bench::bench(a),
        Command::Doctor(a) => doctor::doctor(a),
        Command::Initrd(a) => launch::initrd(a),
    };
    ExitCode::from(code)
}
