//! The contract between bootbox's host side (the monitor in `vmm`, the `appliance` builder,
//! the `bootbox` command) and the static guest init (`bootbox-init`): every number and rule
//! both sides rely on lives here once, so neither can drift from the other.
//!
//! - I/O ports: the guest writes its exit status to [`EXIT_PORT`] and boot phase ids to
//!   [`PHASE_PORT`].
//! - Phase ids ([`PHASE_INIT_STARTED`]...) and the exit statuses the init reports for its own
//!   failures and for commands it could not run ([`STATUS_INIT_FAILURE`]...).
//! - The 9p mount: [`NINEP_MSIZE`] and the share tag rule ([`check_share_tag`]).
//! - [`jobspec`]: the job the host hands to the init, and its wire format.
//!
//! The crate has no dependencies (the init links statically and stays small).

pub mod jobspec;
pub mod warm;

use std::fmt;

/// One byte written here is the guest's exit status; the monitor stops the VM.
pub const EXIT_PORT: u16 = 0x600;
/// One byte written here is a phase id; the monitor timestamps it.
pub const PHASE_PORT: u16 = 0x610;
/// How many ports from [`EXIT_PORT`] on the init asks access to (`ioperm`); covers
/// [`PHASE_PORT`].
pub const PORT_SPAN: u16 = 0x20;
const _: () = assert!(PHASE_PORT >= EXIT_PORT && PHASE_PORT < EXIT_PORT + PORT_SPAN);

/// Phase id: the init has started (first thing PID 1 does).
pub const PHASE_INIT_STARTED: u8 = 1;
/// Phase id: every share in the job is mounted.
pub const PHASE_SHARES_MOUNTED: u8 = 2;
/// Phase id: the job's command was started.
pub const PHASE_JOB_STARTED: u8 = 3;
/// Phase id: the job's command ended (its status follows on [`EXIT_PORT`]).
pub const PHASE_JOB_FINISHED: u8 = 4;

/// Exit status when the init itself failed (bad job file, a mount failed...). The same value
/// as the host's own launcher failures, as with `env` and `docker run`.
pub const STATUS_INIT_FAILURE: u8 = 125;
/// Exit status when the job's command exists but cannot be executed.
pub const STATUS_NOT_EXECUTABLE: u8 = 126;
/// Exit status when the job's command is not found.
pub const STATUS_NOT_FOUND: u8 = 127;
/// A job killed by signal `n` reports `STATUS_SIGNAL_BASE + n`.
pub const STATUS_SIGNAL_BASE: u8 = 128;

/// The largest 9p message size the init asks for when mounting a share (the server may
/// negotiate it down).
pub const NINEP_MSIZE: u32 = 512_000;

/// Longest share tag, in bytes. The bootbox virtio-9p device carries the tag in a fixed
/// config area of this size; the guest mounts by tag, so a longer tag could never be mounted.
pub const MAX_SHARE_TAG_LEN: usize = 36;

/// Whether `b` may appear in a share tag: ASCII letters, digits, `_`, `-` and `.`.
pub fn is_share_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Why a share tag is refused (the message states the whole rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadShareTag(pub String);

impl fmt::Display for BadShareTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "share tag {:?} must be 1 to {MAX_SHARE_TAG_LEN} letters, digits, '_', '-' or '.', \
             and not start with '.'",
            self.0
        )
    }
}

impl std::error::Error for BadShareTag {}

/// The one share tag rule. A tag names the virtio-9p device the guest mounts (at most
/// [`MAX_SHARE_TAG_LEN`] bytes) and, with several shares, the directory `/share/TAG` it is
/// mounted on: so a single path component that is neither hidden nor `.`/`..`, in a
/// character set that needs no quoting in a mount source, a path or a shell.
pub fn check_share_tag(tag: &str) -> Result<(), BadShareTag> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_SHARE_TAG_LEN
        && !tag.starts_with('.')
        && tag.bytes().all(is_share_tag_byte);
    if ok {
        Ok(())
    } else {
        Err(BadShareTag(tag.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_tags_follow_one_rule() {
        for good in [
            "a",
            "tree",
            "my-data_1.2",
            "A9",
            &"x".repeat(MAX_SHARE_TAG_LEN),
        ] {
            assert_eq!(check_share_tag(good), Ok(()), "{good}");
        }
        let too_long = "x".repeat(MAX_SHARE_TAG_LEN + 1);
        for bad in [
            "", ".", "..", ".hidden", "a/b", "a,b", "a b", "a:b", "tägg", "a\0", &too_long,
        ] {
            let e = check_share_tag(bad).unwrap_err();
            assert!(e.to_string().contains("1 to 36"), "{e}");
        }
    }
}
