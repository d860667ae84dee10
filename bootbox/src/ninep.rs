//! The job's shares as virtio-9p devices: one confined 9p server per share, one worker pool
//! for all of them, kept for the `--stats` report.

use std::sync::Arc;

use vmm::devices::virtio::Virtio9p;
use vmm::vm::Vm;

use crate::failure::{fail, Failure};
use crate::share::Share;

/// The 9p servers behind a VM's shares, kept for their statistics.
#[derive(Default)]
pub(crate) struct ShareServers {
    servers: Vec<(String, Arc<p9::Server>)>,
    pub(crate) pool: Option<Arc<p9::WorkerPool>>,
}

impl ShareServers {
    /// The 9p part of the `--stats` report.
    pub(crate) fn report(&self) -> String {
        let mut out = String::new();
        for (tag, server) in &self.servers {
            out.push_str(&format!("9p share '{tag}':\n{}", server.stats()));
        }
        if let Some(pool) = &self.pool {
            out.push_str(&format!("{}\n", pool.stats()));
        }
        out
    }
}

/// Set (to anything) only by the escape tests: see `add_shares`.
const UNCHECKED_9P_ENV: &str = "BOOTBOX_TEST_UNCHECKED_9P";

/// Adds a virtio-9p device per share. The servers and their worker pool count requests when
/// the VM's one statistics switch is on.
pub(crate) fn add_shares(
    vm: &mut Vm,
    shares: &[Share],
    ownership: p9::Ownership,
) -> Result<ShareServers, Failure> {
    let stats = vm.stats_enabled();
    let mut kept = ShareServers::default();
    if shares.is_empty() {
        return Ok(kept);
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    let pool = Arc::new(vmm::devices::virtio::fs9p::worker_pool(
        threads,
        "9p-worker",
        stats,
    ));
    // Test-only: the escape tests turn the 9p server's resolution checks off to show that the
    // process sandbox alone stops an escape. Whoever sets bootbox's environment already
    // controls the host, so this gives a guest nothing.
    let resolution_checks = std::env::var_os(UNCHECKED_9P_ENV).is_none();
    if !resolution_checks {
        log::warn!("{UNCHECKED_9P_ENV} is set: the 9p resolution checks are off (tests only)");
    }
    for s in shares {
        let config = p9::Config {
            read_only: s.read_only,
            resolution_checks,
            ownership,
            stats,
            ..p9::Config::default()
        };
        // The directory opened when --share was parsed, not its path resolved again.
        let root = s.root.try_clone()?;
        let server = p9::Server::with_root(root, &s.dir, config)
            .map_err(|e| fail(format!("share {}: {e}", s.dir.display())))?;
        kept.servers.push((s.tag.clone(), server.clone()));
        let dev = Virtio9p::new(&s.tag, server, pool.clone())?;
        vm.add_virtio_device("virtio-9p", Box::new(dev))?;
    }
    kept.pool = Some(pool);
    Ok(kept)
}
