//! The complete KVM state of one x86-64 vCPU: capturing it from a stopped vCPU
//! ([`VcpuState::capture`]), putting it into a fresh vCPU of a fresh VM
//! ([`VcpuState::restore`]) in the order KVM needs, and its encoding in a snapshot's state
//! section. Only kvm-ioctls types are used, so any VM built on them can call it.
//!
//! Parts that depend on a KVM capability (XSAVE, XCRs, debug registers, vCPU events, MP state,
//! TSC frequency) are captured when the capability is there and stored as `None` otherwise;
//! restoring a part the snapshot has on a KVM that lacks the capability is an error, never a
//! silent drop.

use super::codec::{DecodeError, Decoder, Encoder};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

/// IA32_TSC: restored before the deadline so the deadline is relative to the right TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: KVM accepts it only once the LAPIC is in TSC-deadline mode and the TSC
/// is set, so it is kept last in the saved MSR list.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The size of the classic `kvm_xsave` area (KVM_GET_XSAVE without XSAVE2).
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// Upper bound on a decoded XSAVE area (today's largest, with AMX, is about 11 KiB).
const XSAVE_MAX_BYTES: usize = 1 << 20;
/// Upper bound on the MSRs in a decoded state (KVM lists a few hundred at most).
const MSR_MAX_COUNT: usize = 4096;
/// The relative TSC frequency difference below which no rescaling is asked for (as
/// firecracker does: the measured frequency of one host varies by a few ppm between boots).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Why a vCPU's state could not be captured or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("{ioctl} failed: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_MSRS read {read} of {asked} MSRs: MSR {index:#x} could not be read")]
    MsrShortRead {
        read: usize,
        asked: usize,
        index: u32,
    },
    #[error("KVM_SET_MSRS wrote {written} of {asked} MSRs: MSR {index:#x} was refused")]
    MsrShortWrite {
        written: usize,
        asked: usize,
        index: u32,
    },
    #[error("the snapshot has {what} state but this KVM lacks {capability}")]
    MissingCapability {
        what: &'static str,
        capability: &'static str,
    },
    #[error(
        "the snapshot's XSAVE area is {saved} bytes, more than the {supported} this KVM takes"
    )]
    XsaveTooLarge { saved: usize, supported: usize },
    #[error("KVM_RUN with immediate_exit ran the guest instead of returning at once: {0}")]
    UnexpectedExit(String),
    #[error("KVM reports an XSAVE area of {0} bytes, less than the classic 4096")]
    XsaveSizeInvalid(i32),
    #[error("building a KVM {what} list: {source:?}")]
    FamList {
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
}

fn ioctl_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { ioctl, source }
}

fn fam_err(what: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> VcpuStateError {
    move |source| VcpuStateError::FamList { what, source }
}

/// The MSRs worth saving on this host: KVM_GET_MSR_INDEX_LIST (every MSR KVM saves and
/// emulates, kvm-clock's and TSC_DEADLINE included) minus those a read on `vcpu` refuses
/// (MSRs of features the host or the vCPU's CPUID lacks), with TSC_DEADLINE moved last.
/// Probe once per VM, after the vCPU's CPUID is set, and pass the list to every capture.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut saveable = Vec::with_capacity(listed.as_slice().len());
    for &index in listed.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(fam_err("MSR"))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            saveable.push(index);
        }
    }
    order_msrs_for_restore(&mut saveable);
    Ok(saveable)
}

/// Completes the I/O or MMIO access of the vCPU's last exit without running any guest
/// instruction (KVM_RUN with `immediate_exit` set). KVM finishes such an access only on the
/// next KVM_RUN and keeps it in state no ioctl reads: captured right after a port-write exit,
/// the vCPU would still point at the OUT and repeat it when restored. Call this on every
/// stopped vCPU before [`VcpuState::capture`]; the caller has already served the access.
pub fn finish_pending_io(vcpu: &mut VcpuFd) -> Result<(), VcpuStateError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(VcpuStateError::Ioctl {
            ioctl: "KVM_RUN (immediate exit)",
            source,
        }),
        Ok(exit) => Err(VcpuStateError::UnexpectedExit(format!("{exit:?}"))),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

/// Puts TSC_DEADLINE after everything else (TSC in particular), keeping the rest in order.
fn order_msrs_for_restore(indices: &mut [u32]) {
    indices.sort_by_key(|&index| index == MSR_IA32_TSC_DEADLINE);
}

/// One vCPU's KVM state. The field order is the capture order; see
/// [`VcpuState::restore`] for the restore order.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    /// KVM_GET_MP_STATE (runnable, halted, waiting for SIPI...). Read first: the read
    /// delivers pending LAPIC events, which changes the state read after it.
    pub mp_state: Option<kvm_mp_state>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// KVM_GET_FPU: x87/SSE state. Redundant with `xsave` where that exists, kept so
    /// a KVM without XSAVE still restores the FPU.
    pub fpu: kvm_fpu,
    /// KVM_GET_XSAVE(2) area, as bytes (4096, or more with XSAVE2 on hosts with large
    /// dynamic features such as AMX).
    pub xsave: Option<Vec<u8>>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    /// The in-kernel LAPIC's registers (`None` when the VM has no in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// The guest TSC frequency in kHz (KVM_GET_TSC_KHZ).
    pub tsc_khz: Option<u32>,
    /// The CPUID table the vCPU was given (KVM_GET_CPUID2, empty entries dropped).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The values of the MSRs asked for, in restore order.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMM state. Read last: the other reads may
    /// change what is pending.
    pub events: Option<kvm_vcpu_events>,
}

impl VcpuState {
    /// Reads the state of `vcpu`, which must not be running (all vCPUs of the VM stopped,
    /// so that vCPU events and LAPIC state are stable). `msr_indices` comes from
    /// [`saveable_msrs`].
    pub fn capture(
        vm: &VmFd,
        vcpu: &VcpuFd,
        msr_indices: &[u32],
    ) -> Result<VcpuState, VcpuStateError> {
        let mp_state = if vm.check_extension(Cap::MpState) {
            Some(vcpu.get_mp_state().map_err(ioctl_err("KVM_GET_MP_STATE"))?)
        } else {
            None
        };
        let regs = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))?;
        let xsave = if vm.check_extension(Cap::Xsave) {
            Some(capture_xsave(vm, vcpu)?)
        } else {
            None
        };
        let xcrs = if vm.check_extension(Cap::Xcrs) {
            Some(vcpu.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debug_regs = if vm.check_extension(Cap::Debugregs) {
            Some(
                vcpu.get_debug_regs()
                    .map_err(ioctl_err("KVM_GET_DEBUGREGS"))?,
            )
        } else {
            None
        };
        let lapic = match vcpu.get_lapic() {
            Ok(lapic) => Some(lapic),
            // KVM answers EINVAL exactly when the vCPU has no in-kernel LAPIC.
            Err(e) if e.errno() == libc::EINVAL => None,
            Err(e) => return Err(ioctl_err("KVM_GET_LAPIC")(e)),
        };
        let tsc_khz = if vm.check_extension(Cap::GetTscKhz) {
            Some(vcpu.get_tsc_khz().map_err(ioctl_err("KVM_GET_TSC_KHZ"))?)
        } else {
            None
        };
        let mut cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        // KVM_GET_CPUID2 does not shrink the count to the entries it filled; the rest are
        // all-zero. A real leaf 0 has the highest leaf number in EAX, so it is never zero.
        cpuid.retain(|e| *e != kvm_cpuid_entry2::default());
        let msrs = capture_msrs(vcpu, msr_indices)?;
        let events = if vm.check_extension(Cap::VcpuEvents) {
            Some(
                vcpu.get_vcpu_events()
                    .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?,
            )
        } else {
            None
        };
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            tsc_khz,
            cpuid,
            msrs,
            events,
        })
    }

    /// Puts this state into `vcpu`, a vCPU of a fresh VM that has not run yet (and whose VM
    /// has the same in-kernel irqchip as the snapshotted one). The order is what KVM needs:
    ///
    /// 1. CPUID first: KVM validates XSAVE, XCR0, MSRs and more against it, and refuses a
    ///    CPUID change once the vCPU has run.
    /// 2. TSC frequency, before the TSC MSR, so the TSC value is taken at the restored rate.
    /// 3. MP state.
    /// 4. Regs, then sregs (which carry EFER, CRs and the APIC base).
    /// 5. FPU, then XSAVE (which supersedes the FPU's part), then XCRs.
    /// 6. Debug registers.
    /// 7. LAPIC (when the snapshot has one): after sregs, whose APIC base MSR decides where and whether the LAPIC is on.
    /// 8. MSRs: after the LAPIC, since TSC_DEADLINE only sticks once the LAPIC timer is in
    ///    TSC-deadline mode; TSC_DEADLINE is last in the list, after the TSC.
    /// 9. vCPU events last: setting regs clears pending exceptions, and these bring them back.
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(fam_err("CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            restore_tsc_khz(vm, vcpu, khz)?;
        }
        if let Some(mp_state) = self.mp_state {
            require(vm, Cap::MpState, "MP", "KVM_CAP_MP_STATE")?;
            vcpu.set_mp_state(mp_state)
                .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        }
        vcpu.set_regs(&self.regs)
            .map_err(ioctl_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl_err("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(ioctl_err("KVM_SET_FPU"))?;
        if let Some(xsave) = &self.xsave {
            require(vm, Cap::Xsave, "XSAVE", "KVM_CAP_XSAVE")?;
            restore_xsave(vm, vcpu, xsave)?;
        }
        if let Some(xcrs) = &self.xcrs {
            require(vm, Cap::Xcrs, "XCR", "KVM_CAP_XCRS")?;
            vcpu.set_xcrs(xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
        }
        if let Some(debug_regs) = &self.debug_regs {
            require(vm, Cap::Debugregs, "debug register", "KVM_CAP_DEBUGREGS")?;
            vcpu.set_debug_regs(debug_regs)
                .map_err(ioctl_err("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(ioctl_err("KVM_SET_LAPIC"))?;
        }
        restore_msrs(vcpu, &self.msrs)?;
        if let Some(events) = &self.events {
            require(vm, Cap::VcpuEvents, "vCPU event", "KVM_CAP_VCPU_EVENTS")?;
            vcpu.set_vcpu_events(events)
                .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    /// Appends this state to a snapshot's state section.
    pub(crate) fn encode(&self, e: &mut Encoder) {
        e.option(self.mp_state.as_ref(), |e, v| e.pod(v));
        e.pod(&self.regs);
        e.pod(&self.sregs);
        encode_fpu(e, &self.fpu);
        e.option(self.xsave.as_ref(), |e, v| e.blob(v));
        e.option(self.xcrs.as_ref(), |e, v| e.pod(v));
        e.option(self.debug_regs.as_ref(), |e, v| e.pod(v));
        e.option(self.lapic.as_ref(), |e, v| e.pod(v));
        e.option(self.tsc_khz.as_ref(), |e, v| e.u32(*v));
        e.pod_list(&self.cpuid);
        e.pod_list(&self.msrs);
        e.option(self.events.as_ref(), |e, v| e.pod(v));
    }

    /// Reads a state written by [`VcpuState::encode`].
    pub(crate) fn decode(d: &mut Decoder<'_>) -> Result<VcpuState, DecodeError> {
        // Struct fields are evaluated in the order written: the encoding order.
        Ok(VcpuState {
            mp_state: d.option("MP state", |d| d.pod("MP state"))?,
            regs: d.pod("registers")?,
            sregs: d.pod("special registers")?,
            fpu: decode_fpu(d)?,
            xsave: d.option("XSAVE area", decode_xsave)?,
            xcrs: d.option("XCRs", |d| d.pod("XCRs"))?,
            debug_regs: d.option("debug registers", |d| d.pod("debug registers"))?,
            lapic: d.option("LAPIC", |d| d.pod("LAPIC"))?,
            tsc_khz: d.option("TSC frequency", |d| d.u32("TSC frequency"))?,
            cpuid: d.pod_list(KVM_MAX_CPUID_ENTRIES, "CPUID entries")?,
            msrs: d.pod_list(MSR_MAX_COUNT, "MSRs")?,
            events: d.option("vCPU events", |d| d.pod("vCPU events"))?,
        })
    }
}

fn decode_xsave(d: &mut Decoder<'_>) -> Result<Vec<u8>, DecodeError> {
    let bytes = d.blob("XSAVE area")?;
    if bytes.len() > XSAVE_MAX_BYTES || bytes.len() % 4 != 0 {
        return Err(DecodeError::new(
            "XSAVE area",
            format!(
                "{} bytes is not a whole number of 32-bit words up to {XSAVE_MAX_BYTES}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes.to_vec())
}

fn require(
    vm: &VmFd,
    cap: Cap,
    what: &'static str,
    capability: &'static str,
) -> Result<(), VcpuStateError> {
    if vm.check_extension(cap) {
        Ok(())
    } else {
        Err(VcpuStateError::MissingCapability { what, capability })
    }
}

/// The XSAVE area size this KVM reads and writes: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) when
/// supported (it can exceed 4096 bytes), the classic 4096 otherwise.
fn xsave_size(vm: &VmFd) -> Result<usize, VcpuStateError> {
    match vm.check_extension_int(Cap::Xsave2) {
        size if size <= 0 => Ok(XSAVE_LEGACY_BYTES),
        size if (size as usize) < XSAVE_LEGACY_BYTES => Err(VcpuStateError::XsaveSizeInvalid(size)),
        size => Ok(size as usize),
    }
}

/// An [`Xsave`] buffer big enough for `bytes` bytes of XSAVE area.
fn xsave_buffer(bytes: usize) -> Result<Xsave, VcpuStateError> {
    let extra_words = (bytes - XSAVE_LEGACY_BYTES).div_ceil(4);
    Xsave::new(extra_words).map_err(fam_err("XSAVE"))
}

fn capture_xsave(vm: &VmFd, vcpu: &VcpuFd) -> Result<Vec<u8>, VcpuStateError> {
    let size = xsave_size(vm)?;
    if size == XSAVE_LEGACY_BYTES {
        let xsave = vcpu.get_xsave().map_err(ioctl_err("KVM_GET_XSAVE"))?;
        return Ok(words_to_bytes(&xsave.region, &[]));
    }
    let mut xsave = xsave_buffer(size)?;
    // SAFETY: `xsave` was allocated for `size` bytes, the size KVM_CAP_XSAVE2 reports for
    // this VM, which is what KVM_GET_XSAVE2 writes.
    unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(ioctl_err("KVM_GET_XSAVE2"))?;
    Ok(words_to_bytes(
        &xsave.as_fam_struct_ref().xsave.region,
        xsave.as_slice(),
    ))
}

fn restore_xsave(vm: &VmFd, vcpu: &VcpuFd, saved: &[u8]) -> Result<(), VcpuStateError> {
    let size = xsave_size(vm)?;
    if saved.len() > size {
        return Err(VcpuStateError::XsaveTooLarge {
            saved: saved.len(),
            supported: size,
        });
    }
    let mut xsave = xsave_buffer(size)?;
    let (region, extra) = saved.split_at(saved.len().min(XSAVE_LEGACY_BYTES));
    // SAFETY: only the fixed 4096-byte region is written; the FAM length stays as allocated.
    let fixed = unsafe { &mut xsave.as_mut_fam_struct().xsave.region };
    bytes_to_words(region, fixed);
    bytes_to_words(extra, xsave.as_mut_slice());
    // SAFETY: `xsave` was allocated for the size KVM_CAP_XSAVE2 reports for this VM (or the
    // classic 4096 bytes when it has no XSAVE2), which is how much KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"))
}

fn words_to_bytes(region: &[u32], extra: &[u32]) -> Vec<u8> {
    region
        .iter()
        .chain(extra)
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Copies little-endian words from `bytes` into the start of `words` (the rest is untouched).
fn bytes_to_words(bytes: &[u8], words: &mut [u32]) {
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
        let mut le = [0u8; 4];
        le[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_le_bytes(le);
    }
}

fn capture_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut values = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(fam_err("MSR"))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(ioctl_err("KVM_GET_MSRS"))?;
        if read != chunk.len() {
            return Err(VcpuStateError::MsrShortRead {
                read,
                asked: chunk.len(),
                index: chunk.get(read).copied().unwrap_or_default(),
            });
        }
        values.extend_from_slice(msrs.as_slice());
    }
    Ok(values)
}

fn restore_msrs(vcpu: &VcpuFd, saved: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    for chunk in saved.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(fam_err("MSR"))?;
        let written = vcpu.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if written != chunk.len() {
            return Err(VcpuStateError::MsrShortWrite {
                written,
                asked: chunk.len(),
                index: chunk.get(written).map(|e| e.index).unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// Sets the guest TSC frequency to the snapshot's when this vCPU's differs by more than the
/// tolerance; a KVM that cannot scale the TSC then fails the restore (the guest's clock
/// would run at the wrong rate).
fn restore_tsc_khz(vm: &VmFd, vcpu: &VcpuFd, saved_khz: u32) -> Result<(), VcpuStateError> {
    require(vm, Cap::GetTscKhz, "TSC frequency", "KVM_CAP_GET_TSC_KHZ")?;
    let current = vcpu.get_tsc_khz().map_err(ioctl_err("KVM_GET_TSC_KHZ"))?;
    if tsc_khz_close(current, saved_khz) {
        return Ok(());
    }
    require(
        vm,
        Cap::TscControl,
        "a different TSC frequency",
        "KVM_CAP_TSC_CONTROL",
    )?;
    vcpu.set_tsc_khz(saved_khz)
        .map_err(ioctl_err("KVM_SET_TSC_KHZ"))
}

fn tsc_khz_close(a: u32, b: u32) -> bool {
    let diff = u64::from(a.abs_diff(b));
    diff * 1_000_000 <= u64::from(b) * TSC_KHZ_TOLERANCE_PPM
}

fn encode_fpu(e: &mut Encoder, fpu: &kvm_fpu) {
    for reg in fpu.fpr.iter().chain(&fpu.xmm) {
        e.pod(reg);
    }
    e.u32(u32::from(fpu.fcw) | (u32::from(fpu.fsw) << 16));
    e.u32(u32::from(fpu.ftwx) | (u32::from(fpu.last_opcode) << 16));
    e.u64(fpu.last_ip);
    e.u64(fpu.last_dp);
    e.u32(fpu.mxcsr);
}

fn decode_fpu(d: &mut Decoder<'_>) -> Result<kvm_fpu, DecodeError> {
    let mut fpu = kvm_fpu::default();
    for reg in fpu.fpr.iter_mut().chain(&mut fpu.xmm) {
        *reg = d.pod("FPU registers")?;
    }
    let status = d.u32("FPU control and status")?;
    (fpu.fcw, fpu.fsw) = (status as u16, (status >> 16) as u16);
    let tag = d.u32("FPU tag and opcode")?;
    (fpu.ftwx, fpu.last_opcode) = (tag as u8, (tag >> 16) as u16);
    fpu.last_ip = d.u64("FPU last instruction pointer")?;
    fpu.last_dp = d.u64("FPU last data pointer")?;
    fpu.mxcsr = d.u32("MXCSR")?;
    Ok(fpu)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state with a distinct value in every kind of field, for round-trip tests.
    pub(crate) fn sample_state(seed: u8) -> VcpuState {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0xab,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 42,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[3][5] = seed;
        fpu.xmm[15][0] = seed.wrapping_add(1);
        let mut lapic = kvm_lapic_state { regs: [0; 1024] };
        lapic.regs[0x80] = seed as i8;
        VcpuState {
            mp_state: Some(kvm_mp_state { mp_state: 3 }),
            regs: kvm_regs {
                rax: u64::from(seed),
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x11,
                efer: 0x500,
                ..Default::default()
            },
            fpu,
            xsave: Some((0..4096u32).map(|i| (i as u8) ^ seed).collect()),
            xcrs: None,
            debug_regs: Some(kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            }),
            lapic: Some(lapic),
            tsc_khz: Some(2_000_000),
            cpuid: vec![kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            }],
            msrs: vec![
                kvm_msr_entry {
                    index: MSR_IA32_TSC,
                    data: 99,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: MSR_IA32_TSC_DEADLINE,
                    data: 100,
                    ..Default::default()
                },
            ],
            events: Some(kvm_vcpu_events::default()),
        }
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        for seed in [0u8, 7, 255] {
            let state = sample_state(seed);
            let mut e = Encoder::default();
            state.encode(&mut e);
            let bytes = e.into_bytes();
            let mut d = Decoder::new(&bytes);
            assert_eq!(VcpuState::decode(&mut d).unwrap(), state);
            d.finish("vCPU").unwrap();
        }
    }

    #[test]
    fn every_truncation_of_the_encoding_is_an_error() {
        let mut e = Encoder::default();
        sample_state(1).encode(&mut e);
        let bytes = e.into_bytes();
        for len in 0..bytes.len() {
            let mut d = Decoder::new(&bytes[..len]);
            assert!(VcpuState::decode(&mut d).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn tsc_deadline_is_ordered_after_the_tsc() {
        let mut indices = vec![MSR_IA32_TSC_DEADLINE, 0x174, MSR_IA32_TSC, 0x4b56_4d01];
        order_msrs_for_restore(&mut indices);
        assert_eq!(
            indices,
            vec![0x174, MSR_IA32_TSC, 0x4b56_4d01, MSR_IA32_TSC_DEADLINE]
        );
    }

    #[test]
    fn xsave_words_round_trip_through_bytes() {
        let bytes: Vec<u8> = (0..20u8).collect();
        let mut words = [0u32; 5];
        bytes_to_words(&bytes, &mut words);
        assert_eq!(words[1], u32::from_le_bytes([4, 5, 6, 7]));
        assert_eq!(words_to_bytes(&words[..3], &words[3..]), bytes);
    }

    #[test]
    fn tsc_frequencies_within_250_ppm_need_no_scaling() {
        assert!(tsc_khz_close(2_000_000, 2_000_400));
        assert!(!tsc_khz_close(2_000_000, 2_001_000));
        assert!(tsc_khz_close(0, 0));
    }
}
