//! Warm start: the channel through which a job reaches an init that was resumed from a
//! snapshot instead of booted.
//!
//! The snapshot is taken where the init waits for its job: before any share is mounted or any
//! job byte entered the guest. The init announces that point by writing [`JOB_READY`] to
//! [`JOB_PORT`] (the host stops the VM there when it makes a snapshot). Resumed, it reads a
//! 4-byte little-endian length with one 32-bit `in` from [`JOB_PORT`] and then that many bytes
//! with `rep insb` from the same port: a [`WarmJob`] in the format of [`WarmJob::encode`].
//!
//! The init waits on this channel (instead of reading [`crate::jobspec::JOB_PATH`]) when the
//! initramfs holds [`WARM_WAIT_PATH`]. Shares are the virtio-9p devices that already exist in
//! the snapshot: [`SHARE_SLOTS`] of them, tagged [`slot_tag`]; the job's [`ShareMount`]s name
//! those tags.
//!
//! Wire format of a [`WarmJob`] (little-endian): magic `BBWARM`, version u16, wall-clock
//! seconds u64 and nanoseconds u32 (since the Unix epoch, host time when the job was sent), a
//! [`SEED_LEN`]-byte random seed, then the job's own encoding ([`Job::encode`]) to the end.
//!
//! [`ShareMount`]: crate::jobspec::ShareMount

use crate::jobspec::{Job, JobSpecError};
use std::fmt;

/// The job channel: `out` [`JOB_READY`] marks the snapshot point; `in` reads the job.
pub const JOB_PORT: u16 = 0x618;
const _: () =
    assert!(JOB_PORT >= crate::EXIT_PORT && JOB_PORT < crate::EXIT_PORT + crate::PORT_SPAN);
/// Written to [`JOB_PORT`] when the init waits for its job.
pub const JOB_READY: u8 = 1;
/// Present in the initramfs when the init must wait for its job on [`JOB_PORT`].
pub const WARM_WAIT_PATH: &str = "/bootbox/warm-wait";
/// Phase id (on [`crate::PHASE_PORT`]): a resumed init has received its job.
pub const PHASE_JOB_RECEIVED: u8 = 5;
/// How many virtio-9p devices a warm appliance has; a job with more shares boots cold.
pub const SHARE_SLOTS: usize = 4;
/// Bytes of fresh randomness each job brings for the guest's RNG.
pub const SEED_LEN: usize = 32;
/// The largest warm job message accepted (length prefix excluded).
pub const MAX_WARM_JOB_LEN: u32 = 4 << 20;

/// Magic of a [`WarmJob`] message.
pub const WARM_MAGIC: &[u8; 6] = b"BBWARM";
/// Version of the [`WarmJob`] wire format.
pub const WARM_VERSION: u16 = 1;
const HEADER_LEN: usize = WARM_MAGIC.len() + 2 + 8 + 4 + SEED_LEN;

/// The mount tag of share slot `index` (0-based).
pub fn slot_tag(index: usize) -> String {
    format!("bootbox-slot{index}")
}

/// What a resumed init receives: the job plus what makes the resumed guest indistinguishable
/// from a freshly booted one (the wall clock and fresh randomness).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmJob {
    /// Host wall-clock time when the job was sent: seconds since the Unix epoch.
    pub wall_clock_secs: u64,
    /// ... and nanoseconds (below 1e9).
    pub wall_clock_nanos: u32,
    /// Fresh random bytes the init mixes into the guest RNG and credits.
    pub seed: [u8; SEED_LEN],
    /// The job, with share tags naming slots ([`slot_tag`]).
    pub job: Job,
}

/// Why a warm job message is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmJobError {
    /// Shorter than the fixed header.
    Truncated(usize),
    /// The magic is wrong.
    BadMagic,
    /// A version this side does not speak.
    Version(u16),
    /// Nanoseconds of 1e9 or more.
    BadTime(u32),
    /// The embedded job is invalid.
    Job(JobSpecError),
}

impl fmt::Display for WarmJobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WarmJobError::Truncated(n) => {
                write!(
                    f,
                    "warm job of {n} bytes is shorter than its {HEADER_LEN}-byte header"
                )
            }
            WarmJobError::BadMagic => write!(f, "not a warm job (bad magic)"),
            WarmJobError::Version(v) => {
                write!(f, "warm job version {v}, this side speaks {WARM_VERSION}")
            }
            WarmJobError::BadTime(n) => write!(f, "wall-clock nanoseconds {n} out of range"),
            WarmJobError::Job(e) => write!(f, "warm job: {e}"),
        }
    }
}

impl std::error::Error for WarmJobError {}

impl WarmJob {
    /// The message bytes (without the length prefix the port sends first).
    pub fn encode(&self) -> Result<Vec<u8>, WarmJobError> {
        if self.wall_clock_nanos >= 1_000_000_000 {
            return Err(WarmJobError::BadTime(self.wall_clock_nanos));
        }
        let job = self.job.encode().map_err(WarmJobError::Job)?;
        let mut out = Vec::with_capacity(HEADER_LEN + job.len());
        out.extend_from_slice(WARM_MAGIC);
        out.extend_from_slice(&WARM_VERSION.to_le_bytes());
        out.extend_from_slice(&self.wall_clock_secs.to_le_bytes());
        out.extend_from_slice(&self.wall_clock_nanos.to_le_bytes());
        out.extend_from_slice(&self.seed);
        out.extend_from_slice(&job);
        Ok(out)
    }

    /// What the port sends: the message length (u32 LE), then the message.
    pub fn channel_bytes(&self) -> Result<Vec<u8>, WarmJobError> {
        let message = self.encode()?;
        let mut out = Vec::with_capacity(4 + message.len());
        out.extend_from_slice(&(message.len() as u32).to_le_bytes());
        out.extend_from_slice(&message);
        Ok(out)
    }

    /// Parses and validates a message; never panics on malformed input.
    pub fn decode(bytes: &[u8]) -> Result<WarmJob, WarmJobError> {
        if bytes.len() < HEADER_LEN {
            return Err(WarmJobError::Truncated(bytes.len()));
        }
        let (magic, rest) = bytes.split_at(WARM_MAGIC.len());
        if magic != WARM_MAGIC {
            return Err(WarmJobError::BadMagic);
        }
        let (version, rest) = rest.split_at(2);
        let version = u16::from_le_bytes([version[0], version[1]]);
        if version != WARM_VERSION {
            return Err(WarmJobError::Version(version));
        }
        let (secs, rest) = rest.split_at(8);
        let (nanos, rest) = rest.split_at(4);
        let (seed_bytes, job) = rest.split_at(SEED_LEN);
        let mut secs_le = [0u8; 8];
        secs_le.copy_from_slice(secs);
        let mut nanos_le = [0u8; 4];
        nanos_le.copy_from_slice(nanos);
        let wall_clock_nanos = u32::from_le_bytes(nanos_le);
        if wall_clock_nanos >= 1_000_000_000 {
            return Err(WarmJobError::BadTime(wall_clock_nanos));
        }
        let mut seed = [0u8; SEED_LEN];
        seed.copy_from_slice(seed_bytes);
        Ok(WarmJob {
            wall_clock_secs: u64::from_le_bytes(secs_le),
            wall_clock_nanos,
            seed,
            job: Job::decode(job).map_err(WarmJobError::Job)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobspec::ShareMount;

    fn sample() -> WarmJob {
        WarmJob {
            wall_clock_secs: 1_700_000_000,
            wall_clock_nanos: 123_456_789,
            seed: core::array::from_fn(|i| i as u8 * 7),
            job: Job {
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"ls /share".to_vec()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/share".into()),
                shares: vec![ShareMount {
                    tag: slot_tag(0),
                    mount_point: "/share".into(),
                    read_only: true,
                }],
                ..Job::default()
            },
        }
    }

    #[test]
    fn warm_job_round_trips_through_the_channel_bytes() {
        let w = sample();
        let bytes = w.channel_bytes().unwrap();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(WarmJob::decode(&bytes[4..]).unwrap(), w);
    }

    #[test]
    fn every_truncation_and_bad_header_is_an_error() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(WarmJob::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert_eq!(WarmJob::decode(&bad), Err(WarmJobError::BadMagic));
        let mut bad = bytes.clone();
        bad[6] = 9;
        assert_eq!(WarmJob::decode(&bad), Err(WarmJobError::Version(9)));
        let mut bad = bytes;
        bad[16..20].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        assert_eq!(
            WarmJob::decode(&bad),
            Err(WarmJobError::BadTime(1_000_000_000))
        );
    }

    #[test]
    fn slot_tags_are_valid_share_tags() {
        for i in 0..SHARE_SLOTS {
            crate::check_share_tag(&slot_tag(i)).unwrap();
        }
    }
}
