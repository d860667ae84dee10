//! The per-run job archive: a tiny second cpio holding `/bootbox/job`, which the kernel
//! unpacks on top of the cached base appliance (the VMM concatenates both archives in guest
//! memory). The job type and its wire format live in [`crate::jobspec`], shared with the guest
//! init through the `guest-abi` crate.

pub use crate::jobspec::{
    default_mount_point, disk_device_name, DiskAttachment, Job, JobSpecError, ShareMount, JOB_PATH,
};

use crate::cpio::CpioWriter;

/// An archive with the directory `/bootbox` and the encoded job at `/bootbox/job`.
///
/// Fails only if the job is invalid (NUL bytes, bad env names, relative mount points...).
pub fn job_cpio(job: &Job) -> Result<Vec<u8>, JobSpecError> {
    let data = job.encode()?;
    let mut w = CpioWriter::new(Vec::with_capacity(data.len() + 512));
    let written = (|| {
        w.add_dir("bootbox", 0o755)?;
        w.add_bytes(JOB_PATH.trim_start_matches('/'), 0o644, &data)?;
        w.finish()
    })();
    // Writing to a Vec cannot fail and the names are constants.
    written.map_err(|e| JobSpecError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_cpio_contains_the_encoded_job() {
        let job = Job {
            argv: vec!["find".into(), "/share".into(), "-type".into(), "f".into()],
            env: vec![("LANG".into(), "C.UTF-8".into())],
            cwd: None,
            shares: vec![ShareMount {
                tag: "share0".into(),
                mount_point: default_mount_point("share0", 1),
                read_only: true,
            }],
            ..Job::default()
        };
        let cpio = job_cpio(&job).unwrap();
        let enc = job.encode().unwrap();
        assert!(cpio.windows(enc.len()).any(|w| w == enc.as_slice()));
        assert!(cpio.windows(12).any(|w| w == b"bootbox/job\0"));
        assert_eq!(cpio.len() % 4, 0);
        let bad = Job {
            argv: vec!["a\0".into()],
            ..Job::default()
        };
        assert!(job_cpio(&bad).is_err());
    }
}
