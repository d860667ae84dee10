//! The job description handed from the host to the guest init, and its wire format.
//!
//! The `appliance` library encodes with it and the guest init (`bootbox-init`) decodes with
//! it: one source for both ends, so encoder and decoder can never drift apart.
//!
//! Wire format (all integers little-endian):
//!
//! ```text
//! magic  "BBJOB\0"            6 bytes
//! version u16                 (1 or 2; see below)
//! argc u32, then argc strings
//! envc u32, then envc pairs of strings (key, value)
//! has_cwd u8 (0/1), then one string if 1
//! sharec u32, then per share: tag string, mount point string, read_only u8 (0/1)
//! -- version 2 only:
//! diskc u32, then per disk (in attachment order: vda, vdb, ...): read_only u8 (0/1)
//! mount_disks u8 (0/1)
//! ```
//!
//! Version 2 only appends the disk fields. A job without disks and without `mount_disks` is
//! still written as version 1, byte for byte what an older init reads; the decoder reads both.
//!
//! A string is `len u32` followed by `len` bytes: UTF-8, except command arguments, which are
//! any bytes (a file name need not be UTF-8). No string may contain NUL (they become C strings
//! in the guest); env keys must be non-empty and contain no `=`; share tags follow
//! [`crate::check_share_tag`] and mount points are checked as well. Trailing bytes after the last share are an error.

use std::fmt;

/// Magic bytes that start every encoded job.
pub const JOB_MAGIC: &[u8; 6] = b"BBJOB\0";
/// Current wire format version (the newest one written and read).
pub const JOB_VERSION: u16 = 2;
/// The first version, without the disk fields; still written for jobs that use no disks.
pub const JOB_VERSION_NO_DISKS: u16 = 1;
/// Where the job file lives inside the appliance.
pub const JOB_PATH: &str = "/bootbox/job";
/// Upper bound on any single count or string length accepted by the decoder.
const MAX_ITEMS: u32 = 1 << 16;
const MAX_STRING: u32 = 1 << 20;

/// One virtio-9p share the guest mounts before the job starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareMount {
    /// The 9p mount tag the device advertises.
    pub tag: String,
    /// Absolute path in the guest where the share is mounted.
    pub mount_point: String,
    /// Mount read-only (MS_RDONLY, cached) instead of read-write (uncached).
    pub read_only: bool,
}

/// One virtio-blk disk the VMM attaches; the guest names them `/dev/vda`, `/dev/vdb`, ... in
/// attachment order ([`disk_device_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskAttachment {
    /// The init marks the disk and its partitions read-only in the guest kernel (BLKROSET)
    /// before anything runs, so nothing in the guest writes to it even under a VMM that offers
    /// the disk writable.
    pub read_only: bool,
}

/// The guest's name of the `index`th virtio-blk disk: `vda`, ..., `vdz`, `vdaa`, ... (the
/// kernel's `virtio_blk` naming).
pub fn disk_device_name(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// What the guest runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Job {
    /// Program and arguments, as bytes; empty means an interactive shell on the serial console.
    pub argv: Vec<Vec<u8>>,
    /// Extra environment variables for the job (the init adds PATH, HOME, TERM defaults).
    pub env: Vec<(String, String)>,
    /// Working directory of the job; `None` means `/`.
    pub cwd: Option<String>,
    /// Shares to mount before the job starts.
    pub shares: Vec<ShareMount>,
    /// The virtio-blk disks attached, in order (`/dev/vda` first).
    pub disks: Vec<DiskAttachment>,
    /// Mount every recognised filesystem on the disks read-only under `/disk/<device>` before
    /// the job starts.
    pub mount_disks: bool,
}

/// Why a job could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSpecError {
    /// The input does not start with the job magic.
    BadMagic,
    /// The input was written by an incompatible version.
    UnsupportedVersion(u16),
    /// The input ended in the middle of a field.
    Truncated,
    /// Bytes were left over after the last field.
    TrailingBytes(usize),
    /// A count or length is beyond the accepted limits.
    TooLarge(&'static str),
    /// A string is not valid UTF-8.
    NotUtf8(&'static str),
    /// A string contains a NUL byte, which cannot be passed to the guest.
    ContainsNul(&'static str),
    /// A field value is not acceptable (message says which and why).
    Invalid(String),
}

impl fmt::Display for JobSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobSpecError::BadMagic => write!(f, "job file does not start with the bootbox job magic"),
            JobSpecError::UnsupportedVersion(v) => write!(
                f,
                "job file format version {v} is not supported (expected {JOB_VERSION_NO_DISKS} to {JOB_VERSION}); rebuild the appliance and the init together"
            ),
            JobSpecError::Truncated => write!(f, "job file is truncated"),
            JobSpecError::TrailingBytes(n) => write!(f, "job file has {n} unexpected trailing bytes"),
            JobSpecError::TooLarge(what) => write!(f, "job file: {what} is too large"),
            JobSpecError::NotUtf8(what) => write!(f, "job file: {what} is not valid UTF-8"),
            JobSpecError::ContainsNul(what) => {
                write!(f, "{what} contains a NUL byte, which cannot be passed to a program")
            }
            JobSpecError::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for JobSpecError {}

/// The mount point the host picks for a share: `/share` when it is the only one,
/// `/share/TAG` when there are several.
pub fn default_mount_point(tag: &str, share_count: usize) -> String {
    if share_count <= 1 {
        "/share".to_string()
    } else {
        format!("/share/{tag}")
    }
}

fn check_str(s: &str, what: &'static str) -> Result<(), JobSpecError> {
    check_bytes(s.as_bytes(), what)
}

fn check_bytes(s: &[u8], what: &'static str) -> Result<(), JobSpecError> {
    if s.contains(&0) {
        return Err(JobSpecError::ContainsNul(what));
    }
    if s.len() > MAX_STRING as usize {
        return Err(JobSpecError::TooLarge(what));
    }
    Ok(())
}

fn check_abs_path(p: &str, what: &str) -> Result<(), JobSpecError> {
    if !p.starts_with('/') {
        return Err(JobSpecError::Invalid(format!(
            "{what} {p:?} must be an absolute path"
        )));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(JobSpecError::Invalid(format!(
            "{what} {p:?} must not contain '..'"
        )));
    }
    Ok(())
}

impl Job {
    /// Checks every field; both `encode` and `decode` call this.
    pub fn validate(&self) -> Result<(), JobSpecError> {
        if self.argv.len() > MAX_ITEMS as usize {
            return Err(JobSpecError::TooLarge("argument list"));
        }
        for a in &self.argv {
            check_bytes(a, "a command argument")?;
        }
        if let Some(first) = self.argv.first() {
            if first.is_empty() {
                return Err(JobSpecError::Invalid("the command name is empty".into()));
            }
        }
        if self.env.len() > MAX_ITEMS as usize {
            return Err(JobSpecError::TooLarge("environment"));
        }
        for (k, v) in &self.env {
            check_str(k, "an environment variable name")?;
            check_str(v, "an environment variable value")?;
            if k.is_empty() || k.contains('=') {
                return Err(JobSpecError::Invalid(format!(
                    "environment variable name {k:?} must be non-empty and contain no '='"
                )));
            }
        }
        if let Some(cwd) = &self.cwd {
            check_str(cwd, "the working directory")?;
            check_abs_path(cwd, "working directory")?;
        }
        if self.shares.len() > MAX_ITEMS as usize {
            return Err(JobSpecError::TooLarge("share list"));
        }
        for s in &self.shares {
            check_str(&s.tag, "a share tag")?;
            check_str(&s.mount_point, "a share mount point")?;
            crate::check_share_tag(&s.tag).map_err(|e| JobSpecError::Invalid(e.to_string()))?;
            check_abs_path(&s.mount_point, "share mount point")?;
            if s.mount_point == "/" {
                return Err(JobSpecError::Invalid(
                    "a share cannot be mounted on / (pick a directory like /share)".into(),
                ));
            }
        }
        if self.disks.len() > MAX_ITEMS as usize {
            return Err(JobSpecError::TooLarge("disk list"));
        }
        Ok(())
    }

    /// The oldest wire format version that can carry this job.
    fn wire_version(&self) -> u16 {
        if self.disks.is_empty() && !self.mount_disks {
            JOB_VERSION_NO_DISKS
        } else {
            JOB_VERSION
        }
    }

    /// Encodes the job in the wire format described in the module docs.
    pub fn encode(&self) -> Result<Vec<u8>, JobSpecError> {
        self.validate()?;
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(JOB_MAGIC);
        let version = self.wire_version();
        out.extend_from_slice(&version.to_le_bytes());
        put_u32(&mut out, self.argv.len());
        for a in &self.argv {
            put_bytes(&mut out, a);
        }
        put_u32(&mut out, self.env.len());
        for (k, v) in &self.env {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        match &self.cwd {
            Some(c) => {
                out.push(1);
                put_str(&mut out, c);
            }
            None => out.push(0),
        }
        put_u32(&mut out, self.shares.len());
        for s in &self.shares {
            put_str(&mut out, &s.tag);
            put_str(&mut out, &s.mount_point);
            out.push(u8::from(s.read_only));
        }
        if version >= 2 {
            put_u32(&mut out, self.disks.len());
            for d in &self.disks {
                out.push(u8::from(d.read_only));
            }
            out.push(u8::from(self.mount_disks));
        }
        Ok(out)
    }

    /// Decodes and validates a job; never panics on malformed input.
    pub fn decode(bytes: &[u8]) -> Result<Job, JobSpecError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.take(JOB_MAGIC.len())? != JOB_MAGIC {
            return Err(JobSpecError::BadMagic);
        }
        let v = r.take(2)?;
        let version = u16::from_le_bytes([v[0], v[1]]);
        if !(JOB_VERSION_NO_DISKS..=JOB_VERSION).contains(&version) {
            return Err(JobSpecError::UnsupportedVersion(version));
        }
        let argc = r.count("argument count")?;
        let mut argv = Vec::new();
        for _ in 0..argc {
            argv.push(r.bytes("a command argument")?.to_vec());
        }
        let envc = r.count("environment count")?;
        let mut env = Vec::new();
        for _ in 0..envc {
            let k = r.string("an environment variable name")?;
            let v = r.string("an environment variable value")?;
            env.push((k, v));
        }
        let cwd = match r.flag("working directory flag")? {
            true => Some(r.string("the working directory")?),
            false => None,
        };
        let sharec = r.count("share count")?;
        let mut shares = Vec::new();
        for _ in 0..sharec {
            let tag = r.string("a share tag")?;
            let mount_point = r.string("a share mount point")?;
            let read_only = r.flag("share read-only flag")?;
            shares.push(ShareMount {
                tag,
                mount_point,
                read_only,
            });
        }
        let mut disks = Vec::new();
        let mut mount_disks = false;
        if version >= 2 {
            let diskc = r.count("disk count")?;
            for _ in 0..diskc {
                disks.push(DiskAttachment {
                    read_only: r.flag("disk read-only flag")?,
                });
            }
            mount_disks = r.flag("mount-disks flag")?;
        }
        if r.pos != bytes.len() {
            return Err(JobSpecError::TrailingBytes(bytes.len() - r.pos));
        }
        let job = Job {
            argv,
            env,
            cwd,
            shares,
            disks,
            mount_disks,
        };
        job.validate()?;
        Ok(job)
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // validate() bounds every count and length far below u32::MAX.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, s: &[u8]) {
    put_u32(out, s.len());
    out.extend_from_slice(s);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], JobSpecError> {
        let end = self.pos.checked_add(n).ok_or(JobSpecError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(JobSpecError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, JobSpecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn count(&mut self, what: &'static str) -> Result<u32, JobSpecError> {
        let n = self.u32()?;
        if n > MAX_ITEMS {
            return Err(JobSpecError::TooLarge(what));
        }
        Ok(n)
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, JobSpecError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(JobSpecError::Invalid(format!(
                "job file: {what} has invalid value {b}"
            ))),
        }
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], JobSpecError> {
        let n = self.u32()?;
        if n > MAX_STRING {
            return Err(JobSpecError::TooLarge(what));
        }
        let b = self.take(n as usize)?;
        if b.contains(&0) {
            return Err(JobSpecError::ContainsNul(what));
        }
        Ok(b)
    }

    fn string(&mut self, what: &'static str) -> Result<String, JobSpecError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| JobSpecError::NotUtf8(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostile() -> Job {
        Job {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo 'a\nb' \"$X\"; printf '\\0'".into(),
                Vec::new(),
                "ünïcødé ✓ 🚀".into(),
                " leading space".into(),
                // A file name that is not UTF-8 passes through as it is.
                b"latin1-\xe9t\xe9 \xff\xfe".to_vec(),
            ],
            env: vec![
                ("X".into(), "multi\nline\r\nvalue=with=equals".into()),
                ("EMPTY".into(), String::new()),
                ("UNI_ñ".into(), "日本語".into()),
            ],
            cwd: Some("/share/dir with spaces/ü".into()),
            shares: vec![
                ShareMount {
                    tag: "data".into(),
                    mount_point: "/share/data".into(),
                    read_only: true,
                },
                ShareMount {
                    tag: "out".into(),
                    mount_point: "/share/out".into(),
                    read_only: false,
                },
            ],
            disks: Vec::new(),
            mount_disks: false,
        }
    }

    fn with_disks() -> Job {
        Job {
            disks: vec![
                DiskAttachment { read_only: true },
                DiskAttachment { read_only: false },
                DiskAttachment { read_only: true },
            ],
            mount_disks: true,
            ..hostile()
        }
    }

    #[test]
    fn round_trip_with_disks_writes_version_2() {
        let job = with_disks();
        let bytes = job.encode().unwrap();
        assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), JOB_VERSION);
        assert_eq!(Job::decode(&bytes).unwrap(), job);
        // mount_disks alone (no disk attached: another VMM's disks) also needs version 2.
        let job = Job {
            mount_disks: true,
            ..hostile()
        };
        assert_eq!(Job::decode(&job.encode().unwrap()).unwrap(), job);
        for n in 0..bytes.len() {
            assert!(Job::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn jobs_without_disks_stay_version_1_byte_for_byte() {
        let job = hostile();
        let bytes = job.encode().unwrap();
        assert_eq!(
            u16::from_le_bytes([bytes[6], bytes[7]]),
            JOB_VERSION_NO_DISKS
        );
        // Version 1 ends right after the shares: the disk fields appended by hand to the same
        // bytes under version 2 decode to the same job.
        let mut v2 = bytes.clone();
        v2[6..8].copy_from_slice(&2u16.to_le_bytes());
        v2.extend_from_slice(&0u32.to_le_bytes());
        v2.push(0);
        assert_eq!(Job::decode(&v2).unwrap(), job);
        // A version-1 job with trailing disk fields is an error, not silently read.
        let mut bad = bytes;
        bad.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Job::decode(&bad),
            Err(JobSpecError::TrailingBytes(4))
        ));
    }

    #[test]
    fn disk_names_follow_the_kernel() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .iter()
            .map(|&i| disk_device_name(i))
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"]
        );
    }

    #[test]
    fn round_trip_hostile_strings() {
        let job = hostile();
        let bytes = job.encode().unwrap();
        assert_eq!(&bytes[..6], JOB_MAGIC);
        assert_eq!(Job::decode(&bytes).unwrap(), job);
    }

    #[test]
    fn round_trip_interactive_empty_job() {
        let job = Job::default();
        let bytes = job.encode().unwrap();
        assert_eq!(Job::decode(&bytes).unwrap(), job);
    }

    #[test]
    fn nul_bytes_are_refused_when_encoding() {
        let mut job = hostile();
        job.argv.push("a\0b".into());
        assert_eq!(
            job.encode(),
            Err(JobSpecError::ContainsNul("a command argument"))
        );
        let mut job = hostile();
        job.env.push(("K".into(), "v\0".into()));
        assert!(matches!(job.encode(), Err(JobSpecError::ContainsNul(_))));
    }

    #[test]
    fn bad_env_key_and_paths_are_refused() {
        let mut job = hostile();
        job.env.push(("A=B".into(), "v".into()));
        assert!(matches!(job.encode(), Err(JobSpecError::Invalid(_))));
        let mut job = hostile();
        job.cwd = Some("relative".into());
        assert!(matches!(job.encode(), Err(JobSpecError::Invalid(_))));
        let mut job = hostile();
        job.shares[0].mount_point = "/share/../etc".into();
        assert!(matches!(job.encode(), Err(JobSpecError::Invalid(_))));
        let mut job = hostile();
        job.shares[0].tag = "a,b".into();
        assert!(matches!(job.encode(), Err(JobSpecError::Invalid(_))));
        let mut job = hostile();
        job.shares[0].tag = "t".repeat(crate::MAX_SHARE_TAG_LEN + 1);
        assert!(matches!(job.encode(), Err(JobSpecError::Invalid(m)) if m.contains("share tag")));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = hostile().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(
                Job::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Job::decode(&longer), Err(JobSpecError::TrailingBytes(1)));
    }

    #[test]
    fn corrupted_input_is_rejected() {
        let bytes = hostile().encode().unwrap();
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(Job::decode(&bad), Err(JobSpecError::BadMagic));
        let mut bad = bytes.clone();
        bad[6] = 9;
        assert_eq!(Job::decode(&bad), Err(JobSpecError::UnsupportedVersion(9)));
        // A huge argument count must not allocate or panic.
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Job::decode(&bad), Err(JobSpecError::TooLarge(_))));
        // A NUL smuggled into a string on the wire is refused.
        let job = Job {
            argv: vec!["ab".into()],
            ..Job::default()
        };
        let mut bad = job.encode().unwrap();
        let pos = bad.iter().position(|&b| b == b'b').unwrap();
        bad[pos] = 0;
        assert!(matches!(
            Job::decode(&bad),
            Err(JobSpecError::ContainsNul(_))
        ));
        // Arguments may be any bytes; other strings must be UTF-8.
        bad[pos] = 0xff;
        assert_eq!(Job::decode(&bad).unwrap().argv, vec![b"a\xff".to_vec()]);
        let job = Job {
            argv: vec!["true".into()],
            cwd: Some("/ab".into()),
            ..Job::default()
        };
        let mut bad = job.encode().unwrap();
        let pos = bad.iter().rposition(|&b| b == b'b').unwrap();
        bad[pos] = 0xff;
        assert!(matches!(Job::decode(&bad), Err(JobSpecError::NotUtf8(_))));
    }

    #[test]
    fn default_mount_points() {
        assert_eq!(default_mount_point("x", 1), "/share");
        assert_eq!(default_mount_point("x", 2), "/share/x");
    }
}
