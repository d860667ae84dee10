//! The `bootbox` command line: `run` (the appliance), `boot` (a bare kernel), `bench`,
//! `doctor`. Errors from every layer are turned into one message and an exit code here.

mod cli;

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let process_start = Instant::now();
    cli::main(process_start)
}
