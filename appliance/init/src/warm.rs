//! The init's side of warm start (see `guest_abi::warm`): announce the snapshot point on the
//! job port, then, resumed from the snapshot, read the job from the same port, set the wall
//! clock from the host's time and reseed the kernel RNG with the job's fresh seed, so the
//! resumed appliance is indistinguishable from a freshly booted one.

use guest_abi::jobspec::Job;
use guest_abi::warm::{
    WarmJob, JOB_PORT, JOB_READY, MAX_WARM_JOB_LEN, PHASE_JOB_RECEIVED, SEED_LEN, WARM_WAIT_PATH,
};
use std::sync::atomic::Ordering;

/// `_IOW('R', 0x03, int[2])`: add entropy and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Whether this init must wait for its job on the job port.
pub fn waiting() -> bool {
    std::path::Path::new(WARM_WAIT_PATH).exists()
}

/// Marks the snapshot point, then (once resumed) receives the job, sets the clock and
/// reseeds the RNG.
pub fn receive_job() -> Result<Job, String> {
    if super::PORT_MODE.load(Ordering::Relaxed) != 1 {
        return Err(
            "warm start needs direct port access (ioperm); the kernel lacks CONFIG_X86_IOPL_IOPERM"
                .into(),
        );
    }
    super::port_out(JOB_PORT, JOB_READY);
    // ---- A snapshot resumes here. ----
    let len = port_in_u32(JOB_PORT);
    if len == 0 || len > MAX_WARM_JOB_LEN {
        return Err(format!(
            "the host sent a warm job of {len} bytes (expected 1 to {MAX_WARM_JOB_LEN})"
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    port_in_bytes(JOB_PORT, &mut bytes);
    let warm = WarmJob::decode(&bytes).map_err(|e| format!("bad warm job: {e}"))?;
    super::phase(PHASE_JOB_RECEIVED);
    set_wall_clock(warm.wall_clock_secs, warm.wall_clock_nanos)?;
    reseed(&warm.seed)?;
    Ok(warm.job)
}

fn port_in_u32(port: u16) -> u32 {
    let value: u32;
    // SAFETY: ioperm granted this process the port span that holds JOB_PORT; the read has no
    // memory effects in the guest.
    unsafe {
        std::arch::asm!("in eax, dx", in("dx") port, out("eax") value,
            options(nomem, nostack, preserves_flags));
    }
    value
}

fn port_in_bytes(port: u16, buf: &mut [u8]) {
    // SAFETY: `rep insb` writes exactly rcx = buf.len() bytes at rdi = buf's start, all inside
    // the exclusively borrowed buffer; the direction flag is clear (the ABI guarantees it at
    // function boundaries); ioperm granted access to the port.
    unsafe {
        std::arch::asm!("rep insb", in("dx") port,
            inout("rdi") buf.as_mut_ptr() => _, inout("rcx") buf.len() => _,
            options(nostack, preserves_flags));
    }
}

fn set_wall_clock(secs: u64, nanos: u32) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(secs).map_err(|_| format!("wall clock {secs} s"))?,
        tv_nsec: libc::c_long::from(nanos as i32),
    };
    // SAFETY: ts is a valid timespec; PID 1 has CAP_SYS_TIME.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!("cannot set the clock: {}", super::errno_str()));
    }
    Ok(())
}

/// `struct rand_pool_info` with room for the seed.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; SEED_LEN],
}

fn reseed(seed: &[u8; SEED_LEN]) -> Result<(), String> {
    let fd = super::open_path(c"/dev/urandom", libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(format!("cannot open /dev/urandom: {}", super::errno_str()));
    }
    let info = RandPoolInfo {
        entropy_count: (SEED_LEN * 8) as libc::c_int,
        buf_size: SEED_LEN as libc::c_int,
        buf: *seed,
    };
    // SAFETY: fd is open; `info` is a valid rand_pool_info whose buf holds buf_size bytes.
    let added = unsafe { libc::ioctl(fd, RNDADDENTROPY, &info as *const RandPoolInfo) };
    let added_err = super::errno_str();
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let reseeded = unsafe { libc::ioctl(fd, RNDRESEEDCRNG) };
    let reseed_err = super::errno_str();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if added != 0 {
        return Err(format!("RNDADDENTROPY: {added_err}"));
    }
    if reseeded != 0 {
        return Err(format!("RNDRESEEDCRNG: {reseed_err}"));
    }
    Ok(())
}
