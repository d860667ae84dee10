//! Bounded, stable-toolchain fuzz loop for the 9P server: mutates valid requests and feeds them
//! to `Server::handle`, checking every reply and that nothing outside the share changes.
//!
//! Usage: `p9-fuzz [--secs N] [--iters N] [--seed N] [--read-only]`
//! (defaults: 30 s, unlimited iterations, seed from the clock). Environment variables
//! `P9_FUZZ_SECS`, `P9_FUZZ_ITERS`, `P9_FUZZ_SEED` are used when the flags are absent.
//! Exits non-zero on the first violated invariant or panic.

use std::process::ExitCode;

fn arg(args: &[String], name: &str, env: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: p9-fuzz [--secs N] [--iters N] [--seed N] [--read-only]");
        return ExitCode::SUCCESS;
    }
    let parse = |name, env, default: f64| -> Result<f64, String> {
        match arg(&args, name, env) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name} wants a number, got {v:?}")),
        }
    };
    let (secs, iters, seed) = match (
        parse("--secs", "P9_FUZZ_SECS", 30.0),
        parse("--iters", "P9_FUZZ_ITERS", u64::MAX as f64),
        parse(
            "--seed",
            "P9_FUZZ_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as f64)
                .unwrap_or(1.0),
        ),
    ) {
        (Ok(s), Ok(i), Ok(seed)) => (s, i as u64, seed as u64),
        (a, b, c) => {
            for e in [a.err(), b.err(), c.err()].into_iter().flatten() {
                eprintln!("p9-fuzz: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let read_only = args.iter().any(|a| a == "--read-only");
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
