//! Bounded, stable-toolchain fuzz loop for the virtio layer: hostile descriptor chains, queue
//! layouts and MMIO register sequences (see `vmm::devices::virtio::fuzz`), checked against
//! reference models and safety oracles.
//!
//! Usage: `virtio-fuzz [--secs N] [--iters N] [--seed S]`. Prints the rate and exits non-zero
//! on the first failure, panic or hang, naming the seed that replays the failing input
//! (`virtio-fuzz --seed <that seed> --iters 1`).

use clap::Parser;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmm::devices::virtio::fuzz;

/// An input running longer than this is a hang (a good one takes milliseconds).
const HANG: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(about = "Fuzz the virtio layer with hostile guests for a bounded time")]
struct Args {
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    secs: f64,
    /// Stop after this many inputs.
    #[arg(long, default_value_t = u64::MAX)]
    iters: u64,
    /// The first input's seed (default: from the clock). Each later input's seed is derived
    /// from the previous one, and every failure names its own.
    #[arg(long)]
    seed: Option<u64>,
}

/// The seed of the input running now, and when it started (milliseconds since launch + 1;
/// 0 when none is running), for the panic hook and the watchdog.
static CURRENT_SEED: AtomicU64 = AtomicU64::new(0);
static CURRENT_SINCE: AtomicU64 = AtomicU64::new(0);

fn replay_hint(seed: u64) -> String {
    format!("reproduce with: virtio-fuzz --seed {seed} --iters 1")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    // Device threads and worker pools catch or log panics to keep a VM running; a fuzzer
    // must see every one of them.
    std::panic::set_hook(Box::new(|info| {
        let seed = CURRENT_SEED.load(Ordering::SeqCst);
        eprintln!(
            "virtio-fuzz: PANIC: {info}\nvirtio-fuzz: {}",
            replay_hint(seed)
        );
        std::process::abort();
    }));
    let launched = Instant::now();
    let now_ms = move || launched.elapsed().as_millis() as u64 + 1;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let since = CURRENT_SINCE.load(Ordering::SeqCst);
        if since != 0 && now_ms().saturating_sub(since) > HANG.as_millis() as u64 {
            let seed = CURRENT_SEED.load(Ordering::SeqCst);
            eprintln!(
                "virtio-fuzz: HANG: one input ran for more than {HANG:?}\nvirtio-fuzz: {}",
                replay_hint(seed)
            );
            std::process::exit(1);
        }
    });
    println!("virtio-fuzz: seed {seed}, up to {} s", args.secs);
    let start = Instant::now();
    let result = fuzz::run(seed, args.iters, args.secs, |s| {
        CURRENT_SEED.store(s, Ordering::SeqCst);
        CURRENT_SINCE.store(now_ms(), Ordering::SeqCst);
    });
    CURRENT_SINCE.store(0, Ordering::SeqCst);
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    match result {
        Ok(s) => {
            println!(
                "virtio-fuzz: {} inputs in {secs:.1} s ({:.0} inputs/s; {} chain walks, {} device runs, {} register sequences), no failures",
                s.inputs,
                s.inputs as f64 / secs,
                s.walk,
                s.device,
                s.mmio
            );
            let o = fuzz::Outcomes::now();
            println!(
                "virtio-fuzz: chains accepted/refused {}/{}; queue layouts accepted/refused {}/{}; \
                 {} fully judged device runs, {} chains completed, {} ended in DEVICE_NEEDS_RESET; \
                 {} register sequences started a device",
                o.walks_accepted,
                o.walks_refused,
                o.layouts_accepted,
                o.layouts_refused,
                o.strict_runs,
                o.chains_completed,
                o.devices_broken,
                o.mmio_started
            );
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!(
                "virtio-fuzz: FAILURE on input {} (seed {}): {}\nvirtio-fuzz: {}",
                f.input,
                f.input_seed,
                f.failure,
                replay_hint(f.input_seed)
            );
            ExitCode::FAILURE
        }
    }
}
