//! Bounded, stable-toolchain fuzz loop for the 9P server: mutates valid requests and feeds them
//! to `Server::handle`, checking every reply and that nothing outside the share changes.
//!
//! Usage: `p9-fuzz [--secs N] [--iters N] [--seed N] [--read-only]`
//! (defaults: 30 s, unlimited iterations, seed from the clock). Environment variables
//! `P9_FUZZ_SECS`, `P9_FUZZ_ITERS`, `P9_FUZZ_SEED` are used when the flags are absent.
//! Exits non-zero on the first violated invariant or panic.

use clap::Parser;
use std::process::ExitCode;

/// Bounded fuzz loop for the 9P server; exits non-zero on the first violated invariant.
#[derive(Parser, Debug)]
#[command(name = "p9-fuzz")]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, env = "P9_FUZZ_SECS", default_value_t = 30.0)]
    secs: f64,
    /// Most inputs to try [default: unlimited].
    #[arg(long, env = "P9_FUZZ_ITERS")]
    iters: Option<u64>,
    /// Seed of the input generator [default: from the clock].
    #[arg(long, env = "P9_FUZZ_SEED")]
    seed: Option<u64>,
    /// Fuzz a read-only share.
    #[arg(long)]
    read_only: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let secs = args.secs;
    let iters = args.iters.unwrap_or(u64::MAX);
    let read_only = args.read_only;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    // The server catches panics to keep serving; a fuzzer must see them.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("p9-fuzz: PANIC: {info}");
        std::process::abort();
    }));
    println!("p9-fuzz: seed {seed}, up to {secs} s, read_only={read_only}");
    match p9::fuzz::run(seed, iters, secs, read_only) {
        Ok(n) => {
            println!("p9-fuzz: {n} inputs, no failures");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("p9-fuzz: FAILURE (seed {seed}): {e}");
            ExitCode::FAILURE
        }
    }
}
