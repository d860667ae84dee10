//! What a server is created with: its [`Config`] (limits, policy, statistics), the errors
//! creating one can meet, and [`raise_nofile_limit`] for hosts serving many fids.

use crate::ownership::Ownership;
use std::path::PathBuf;
use thiserror::Error;

/// Server limits and policy.
#[derive(Debug, Clone)]
pub struct Config {
    /// Refuse every mutating request with EROFS.
    pub read_only: bool,
    /// Largest msize accepted in Tversion.
    pub msize: u32,
    /// Largest number of fids alive at once in one session.
    pub max_fids: usize,
    /// Largest number of opened (lopen/lcreate) fids at once in one session.
    pub max_open_files: usize,
    /// Test-only: `false` removes the checks that keep walks and requests beneath the share root
    /// (see [`crate::confine`]), so escape tests can show that the process sandbox alone stops
    /// them. Never turn it off otherwise.
    pub resolution_checks: bool,
    /// How a writable share treats the guest's owners, set-id bits and device nodes.
    pub ownership: Ownership,
    /// Collect request statistics ([`crate::Server::stats`]): counts and latency histograms per
    /// message type, at the cost of two clock reads per request. Fixed for the server's life.
    pub stats: bool,
}

impl Default for Config {
    /// Writable, no statistics, msize 512000, and fid/open-file limits of 65536/4096 or half/a quarter of the
    /// process's open-file limit, whichever is smaller (every fid holds a descriptor).
    fn default() -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur as usize
        } else {
            1024
        };
        Config {
            read_only: false,
            msize: 512_000,
            max_fids: 65_536.min(nofile / 2).max(64),
            max_open_files: 4096.min(nofile / 4).max(16),
            resolution_checks: true,
            ownership: Ownership::Mapped,
            stats: false,
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit and returns the new soft
/// limit. Every fid holds a descriptor, so call this before [`Config::default`] when guests may
/// keep many files cached (e.g. a Linux client mounted with `cache=loose`).
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Errors creating a server.
#[derive(Debug, Error)]
pub enum Error {
    #[error("share root {path:?} cannot be opened: {source}; pass an existing directory")]
    RootOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("share root {0:?} is not a directory; pass a directory to export")]
    RootNotDir(PathBuf),
    #[error(
        "cannot open /proc/self/fd ({0}); the 9P server needs /proc mounted to reopen files safely"
    )]
    Proc(std::io::Error),
}

/// Smallest msize we negotiate (room for a header plus a useful payload).
pub(super) const MIN_MSIZE: u32 = 4096;
