//! Snapshot and restore on this machine's /dev/kvm, with VMs built directly on kvm-ioctls: a
//! real-mode guest counts in ECX, stores the count in two memory regions (split by a hole)
//! and reports every 16th count on port 0x500. It is stopped at its first report, snapshotted
//! to a file (vCPU, VM-wide state, device blob, sparse memory) and restored into fresh VMs
//! whose memory maps the file copy-on-write. The restored guest must report 32 next with
//! memory to match, the original and the file must not see its writes, and MSRs, LAPIC,
//! irqchip, PIT and kvm-clock values set before the snapshot must read back after it.
//!
//! Parts this KVM refuses (it may be a software hypervisor) are skipped by name and printed
//! with everything that was covered; the guest-continuation checks never skip.

use kvm_bindings::{
    kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm::snapshot::{
    finish_pending_io, map_guest_memory, read_snapshot, saveable_msrs, write_snapshot,
    SnapshotState, VcpuState, VmState,
};

const CODE_ADDR: u64 = 0x1000;
/// Where the guest stores its count in the low region (DS = 0).
const COUNT_LOW: u64 = 0x2000;
/// Where it stores it in the high region (ES = 0x2000, offset 0).
const COUNT_HIGH: u64 = 0x20000;
const REPORT_PORT: u16 = 0x500;
/// Guest RAM: two regions with a hole between them, as around the MMIO gap.
const RAM: [(u64, usize); 2] = [(0, 0x10000), (0x20000, 0x10000)];
/// MSRs set before the snapshot: SYSENTER_CS/ESP/EIP, STAR, LSTAR, KERNEL_GS_BASE.
const TEST_MSRS: [(u32, u64); 6] = [
    (0x174, 0x10),
    (0x175, 0xdead_b000),
    (0x176, 0xc0de),
    (0xc000_0081, 0x0023_0010_0000_0000),
    (0xc000_0082, 0xffff_8000_0000_1000),
    (0xc000_0102, 0xffff_8880_0000_0000),
];
const LAPIC_TPR: usize = 0x80;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
/// The kvm-clock value the original VM is set to, far from a fresh VM's ~0.
const CLOCK_NS: u64 = 1_000_000_000_000;

/// The guest: loop { ecx += 1; [0x2000] = ecx; es:[0] = ecx; if ecx % 16 == 0 { out 0x500, eax=ecx } }
fn guest_code() -> Vec<u8> {
    let body: &[u8] = &[
        0x66, 0x41, // inc ecx
        0x66, 0x89, 0x0e, 0x00, 0x20, // mov [0x2000], ecx
        0x26, 0x66, 0x89, 0x0e, 0x00, 0x00, // mov es:[0], ecx
        0xf6, 0xc1, 0x0f, // test cl, 0x0f
    ];
    let report: &[u8] = &[
        0x66, 0x89, 0xc8, // mov eax, ecx
        0xba, 0x00, 0x05, // mov dx, 0x500
        0x66, 0xef, // out dx, eax
    ];
    let mut code = body.to_vec();
    code.extend_from_slice(&[0x75, 0]); // jnz start (patched below)
    let jnz_end = code.len();
    code[jnz_end - 1] = (-(jnz_end as i8)) as u8;
    code.extend_from_slice(report);
    code.extend_from_slice(&[0xeb, 0]); // jmp start
    let jmp_end = code.len();
    code[jmp_end - 1] = (-(jmp_end as i8)) as u8;
    code
}

/// What this KVM covered and skipped, printed at the end (run with --nocapture to see it).
#[derive(Default)]
struct Coverage {
    covered: Vec<String>,
    skipped: Vec<String>,
}

impl Coverage {
    fn covered(&mut self, what: impl Into<String>) {
        self.covered.push(what.into());
    }
    fn skipped(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("skipping part: {what}");
        self.skipped.push(what);
    }
    fn print(&self) {
        eprintln!("snapshot test covered:");
        for c in &self.covered {
            eprintln!("  + {c}");
        }
        eprintln!("snapshot test skipped (this KVM refused):");
        for s in &self.skipped {
            eprintln!("  - {s}");
        }
    }
}

/// KVM, or `None` (saying so) when /dev/kvm cannot be opened: the only reason to skip whole.
fn open_kvm() -> Option<Kvm> {
    Kvm::new()
        .map_err(|e| eprintln!("skipping: cannot open /dev/kvm: {e}"))
        .ok()
}

/// A VM with the in-kernel irqchip and PIT when `devices` (and this KVM allows them),
/// `mem` registered as its RAM. Returns whether the devices were created.
fn new_vm(kvm: &Kvm, mem: &GuestMemoryMmap, devices: bool) -> (VmFd, bool) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    let with_devices = devices
        && vm.create_irq_chip().is_ok()
        && vm
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .is_ok();
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
        // SAFETY: `mem` outlives the VM in every test below (both are dropped at the end of
        // the test, the VM first), and the regions do not overlap.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            })
            .expect("KVM_SET_USER_MEMORY_REGION")
        };
    }
    (vm, with_devices)
}

/// Runs `vcpu` until it writes the report port; returns the value written.
fn run_to_report(vcpu: &mut VcpuFd) -> u32 {
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) if port == REPORT_PORT && data.len() == 4 => {
                return u32::from_le_bytes(data.try_into().unwrap());
            }
            // Interrupt-window or similar exits with nothing to do: run on.
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => continue,
            other => panic!("unexpected vCPU exit: {other:?}"),
        }
    }
    panic!("the guest never reported");
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn set_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) -> usize {
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    vcpu.set_msrs(&Msrs::from_entries(&entries).unwrap())
        .unwrap_or(0)
}

fn msr_value(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|e| e.index == index).map(|e| e.data)
}

/// The original VM, run to its first report and stopped, its state captured.
struct Original {
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    with_devices: bool,
    msrs_set: Vec<(u32, u64)>,
    vcpu_state: VcpuState,
    vm_state: VmState,
}

fn boot_original(kvm: &Kvm, cov: &mut Coverage) -> Original {
    let ranges: Vec<(GuestAddress, usize)> =
        RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    mem.write_slice(&guest_code(), GuestAddress(CODE_ADDR))
        .unwrap();
    let (vm, with_devices) = new_vm(kvm, &mem, true);
    if with_devices {
        cov.covered("in-kernel irqchip and PIT created");
    } else {
        cov.skipped("in-kernel irqchip/PIT (KVM_CREATE_IRQCHIP or KVM_CREATE_PIT2 refused)");
    }
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    sregs.es.base = COUNT_HIGH;
    sregs.es.selector = (COUNT_HIGH >> 4) as u16;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();

    // State that must survive the snapshot.
    let mut msrs_set = Vec::new();
    for &(index, value) in &TEST_MSRS {
        if set_msrs(&vcpu, &[(index, value)]) == 1 {
            msrs_set.push((index, value));
        } else {
            cov.skipped(format!("MSR {index:#x} (KVM_SET_MSRS refused it)"));
        }
    }
    if with_devices {
        let mut lapic = vcpu.get_lapic().expect("KVM_GET_LAPIC");
        lapic.regs[LAPIC_TPR] = 0x20;
        lapic.regs[LAPIC_TIMER_DIVIDE] = 0x0b;
        vcpu.set_lapic(&lapic).expect("KVM_SET_LAPIC");
        let mut pic = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        vm.get_irqchip(&mut pic).unwrap();
        pic.chip.pic.imr = 0xfa;
        vm.set_irqchip(&pic).expect("KVM_SET_IRQCHIP");
        let mut pit = vm.get_pit2().expect("KVM_GET_PIT2");
        pit.channels[2].count = 0x1234;
        pit.channels[2].mode = 2;
        vm.set_pit2(&pit).expect("KVM_SET_PIT2");
    }
    match vm.set_clock(&kvm_bindings::kvm_clock_data {
        clock: CLOCK_NS,
        ..Default::default()
    }) {
        Ok(()) => {}
        Err(e) => cov.skipped(format!("kvm-clock (KVM_SET_CLOCK: {e})")),
    }

    assert_eq!(run_to_report(&mut vcpu), 16, "first report");
    assert_eq!(read_u32(&mem, COUNT_LOW), 16);
    assert_eq!(read_u32(&mem, COUNT_HIGH), 16);
    // KVM documents that a port write is complete only after the next KVM_RUN; this
    // machine's KVM has already moved RIP past the OUT at the exit, so here the call is
    // checked to succeed (and the guest to continue exactly), not to change RIP.
    finish_pending_io(&mut vcpu).expect("completing the port write");
    cov.covered("pending port write completed with immediate_exit before capture");

    let msr_indices = saveable_msrs(kvm, &vcpu).expect("probing MSRs");
    let vcpu_state = VcpuState::capture(&vm, &vcpu, &msr_indices).expect("capturing the vCPU");
    let vm_state = VmState::capture(&vm).expect("capturing the VM");
    Original {
        vm,
        vcpu,
        mem,
        with_devices,
        msrs_set,
        vcpu_state,
        vm_state,
    }
}

/// Records which optional parts the capture got on this KVM.
fn note_captured_parts(o: &Original, cov: &mut Coverage) {
    let s = &o.vcpu_state;
    cov.covered(format!(
        "{} MSRs captured (KVM_GET_MSR_INDEX_LIST minus unreadable)",
        s.msrs.len()
    ));
    cov.covered(format!("{} CPUID entries captured", s.cpuid.len()));
    let parts: [(&str, bool); 8] = [
        ("MP state", s.mp_state.is_some()),
        ("XSAVE", s.xsave.is_some()),
        ("XCRs", s.xcrs.is_some()),
        ("debug registers", s.debug_regs.is_some()),
        ("LAPIC", s.lapic.is_some()),
        ("TSC frequency", s.tsc_khz.is_some()),
        ("vCPU events", s.events.is_some()),
        ("kvm-clock", o.vm_state.clock.is_some()),
    ];
    for (name, present) in parts {
        if present {
            cov.covered(format!("{name} captured and restored"));
        } else {
            cov.skipped(format!("{name} (capability not offered)"));
        }
    }
    if let Some(xsave) = &s.xsave {
        cov.covered(format!("XSAVE area of {} bytes", xsave.len()));
    }
    if o.with_devices {
        assert!(
            s.lapic.is_some(),
            "a VM with an irqchip has an in-kernel LAPIC"
        );
        assert!(o.vm_state.irqchip.is_some() && o.vm_state.pit.is_some());
        cov.covered("irqchip (PIC master, PIC slave, IOAPIC) and PIT captured");
    } else {
        assert!(o.vm_state.irqchip.is_none() && o.vm_state.pit.is_none());
    }
}

/// A fresh VM restored from the snapshot at `path`, memory mapped from the file.
fn restore(
    kvm: &Kvm,
    path: &std::path::Path,
    key: &[u8; 32],
    with_devices: bool,
) -> (VmFd, VcpuFd, GuestMemoryMmap, SnapshotState) {
    let snapshot = read_snapshot(path, key).expect("reading the snapshot");
    let mem = map_guest_memory(&snapshot).expect("mapping snapshot memory");
    let (vm, devices) = new_vm(kvm, &mem, with_devices);
    assert_eq!(
        devices, with_devices,
        "the restore VM gets the same devices"
    );
    snapshot.state.vm.restore(&vm).expect("restoring VM state");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    snapshot.state.vcpus[0]
        .restore(&vm, &vcpu)
        .expect("restoring vCPU state");
    (vm, vcpu, mem, snapshot.state)
}

/// Reads the restored vCPU and VM back before they run and compares with the snapshot.
fn check_restored_state(
    o: &Original,
    vm: &VmFd,
    vcpu: &VcpuFd,
    msr_indices: &[u32],
    cov: &mut Coverage,
) {
    let saved = &o.vcpu_state;
    let now = VcpuState::capture(vm, vcpu, msr_indices).expect("capturing the restored vCPU");
    assert_eq!(now.regs, saved.regs, "general registers");
    assert_eq!(now.regs.rcx, 16);
    for (a, b, name) in [
        (now.sregs.cs, saved.sregs.cs, "CS"),
        (now.sregs.ds, saved.sregs.ds, "DS"),
        (now.sregs.es, saved.sregs.es, "ES"),
    ] {
        assert_eq!(a, b, "{name}");
    }
    assert_eq!(
        (now.sregs.cr0, now.sregs.cr4, now.sregs.efer),
        (saved.sregs.cr0, saved.sregs.cr4, saved.sregs.efer)
    );
    cov.covered("regs and sregs read back equal");
    assert_eq!(now.fpu, saved.fpu, "FPU");
    assert_eq!(now.xsave, saved.xsave, "XSAVE area");
    assert_eq!(now.xcrs, saved.xcrs, "XCRs");
    assert_eq!(now.debug_regs, saved.debug_regs, "debug registers");
    assert_eq!(now.mp_state, saved.mp_state, "MP state");
    assert_eq!(now.tsc_khz, saved.tsc_khz, "TSC frequency");
    assert_eq!(now.cpuid, saved.cpuid, "CPUID");
    cov.covered("FPU, XSAVE, XCRs, debug regs, MP state, TSC kHz, CPUID read back equal");
    for &(index, value) in &o.msrs_set {
        assert_eq!(msr_value(saved, index), Some(value), "saved MSR {index:#x}");
        assert_eq!(
            msr_value(&now, index),
            Some(value),
            "restored MSR {index:#x}"
        );
    }
    cov.covered(format!(
        "{} MSRs set before the snapshot read back after restore",
        o.msrs_set.len()
    ));
    for entry in &saved.msrs {
        let restored = msr_value(&now, entry.index);
        if entry.index == vmm::snapshot::vcpu_state::MSR_IA32_TSC {
            let tsc = restored.expect("TSC MSR");
            assert!(
                tsc >= entry.data,
                "the TSC does not go back: {tsc} < {}",
                entry.data
            );
        }
    }
    if let (Some(saved_tsc), Some(tsc)) = (
        msr_value(saved, vmm::snapshot::vcpu_state::MSR_IA32_TSC),
        msr_value(&now, vmm::snapshot::vcpu_state::MSR_IA32_TSC),
    ) {
        let khz = u64::from(saved.tsc_khz.unwrap_or(1_000_000));
        assert!(
            tsc - saved_tsc < khz * 1000 * 10,
            "the restored TSC continues from the saved one: {saved_tsc} -> {tsc}"
        );
        cov.covered("TSC MSR continues from the saved value");
    }
    if let (Some(saved_lapic), Some(lapic)) = (&saved.lapic, &now.lapic) {
        assert_eq!(lapic.regs[LAPIC_TPR], 0x20, "LAPIC TPR");
        assert_eq!(lapic.regs[LAPIC_TIMER_DIVIDE], 0x0b, "LAPIC timer divide");
        assert_eq!(
            saved_lapic.regs[..0x300],
            lapic.regs[..0x300],
            "LAPIC registers"
        );
        cov.covered("LAPIC TPR and timer divide read back");
    }
    let vm_now = VmState::capture(vm).expect("capturing the restored VM");
    assert_eq!(vm_now.irqchip, o.vm_state.irqchip, "irqchip");
    if let Some(irqchip) = &vm_now.irqchip {
        // SAFETY: chip 0 is a PIC, so `pic` is the union's active member.
        assert_eq!(unsafe { irqchip.pic_master.chip.pic.imr }, 0xfa);
        cov.covered("irqchip read back equal (PIC master IMR 0xfa)");
    }
    if let (Some(saved_pit), Some(pit)) = (&o.vm_state.pit, &vm_now.pit) {
        for (a, b) in saved_pit.channels.iter().zip(&pit.channels) {
            assert_eq!((a.count, a.mode, a.gate), (b.count, b.mode, b.gate));
        }
        assert_eq!((pit.channels[2].count, pit.channels[2].mode), (0x1234, 2));
        cov.covered("PIT channels read back (channel 2 count 0x1234, mode 2)");
    }
    if let (Some(saved_clock), Some(clock)) = (&o.vm_state.clock, &vm_now.clock) {
        assert!(saved_clock.clock >= CLOCK_NS);
        assert!(
            clock.clock >= saved_clock.clock && clock.clock < saved_clock.clock + 10_000_000_000,
            "kvm-clock continues from the snapshot: {} -> {}",
            saved_clock.clock,
            clock.clock
        );
        cov.covered("kvm-clock continues from the saved value");
    }
}

#[test]
fn a_restored_guest_continues_where_the_snapshot_stopped() {
    let Some(kvm) = open_kvm() else {
        return;
    };
    let mut cov = Coverage::default();
    let mut original = boot_original(&kvm, &mut cov);
    note_captured_parts(&original, &mut cov);

    let dir = tempfile::Builder::new()
        .prefix("vmm-snapshot-kvm-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("appliance.snap");
    let key = [0x42; 32];
    let state = SnapshotState {
        vm: original.vm_state.clone(),
        vcpus: vec![original.vcpu_state.clone()],
        devices: vec![("test-device".into(), b"device blob".to_vec())],
    };
    write_snapshot(&path, &key, &state, &original.mem).expect("writing the snapshot");

    // First restore: state reads back, then the guest continues from 16 to 32.
    let (vm, mut vcpu, mem, restored_state) = restore(&kvm, &path, &key, original.with_devices);
    assert_eq!(restored_state, state, "state section round trip");
    let msr_indices: Vec<u32> = original.vcpu_state.msrs.iter().map(|e| e.index).collect();
    check_restored_state(&original, &vm, &vcpu, &msr_indices, &mut cov);
    assert_eq!(
        read_u32(&mem, COUNT_LOW),
        16,
        "restored memory before running"
    );
    assert_eq!(
        mem.read_slice_to_vec(CODE_ADDR, guest_code().len()),
        guest_code()
    );
    assert_eq!(
        run_to_report(&mut vcpu),
        32,
        "the restored guest's next report"
    );
    assert_eq!(read_u32(&mem, COUNT_LOW), 32);
    assert_eq!(read_u32(&mem, COUNT_HIGH), 32, "the second memory region");
    cov.covered("restored guest continued exactly: next report 32, both regions hold 32");

    // Copy-on-write: neither the original VM nor the file saw the restored guest's writes.
    assert_eq!(read_u32(&original.mem, COUNT_LOW), 16, "original memory");
    let (_vm2, mut vcpu2, mem2, _) = restore(&kvm, &path, &key, original.with_devices);
    assert_eq!(
        read_u32(&mem2, COUNT_LOW),
        16,
        "a second restore sees the file"
    );
    assert_eq!(read_u32(&mem2, COUNT_HIGH), 16);
    assert_eq!(run_to_report(&mut vcpu2), 32, "the second restored guest");
    assert_eq!(
        read_u32(&mem, COUNT_LOW),
        32,
        "the first restore is unaffected"
    );
    cov.covered("MAP_PRIVATE: original and file untouched; two restores run independently");

    // The original, its pending write completed, continues just as the copies did.
    assert_eq!(
        run_to_report(&mut original.vcpu),
        32,
        "the original's next report"
    );
    drop(original.vm);
    cov.print();
}

/// The snapshot's TSC frequency is applied when it differs from the new vCPU's.
#[test]
fn a_different_tsc_frequency_is_restored() {
    let Some(kvm) = open_kvm() else {
        return;
    };
    let mut cov = Coverage::default();
    let original = boot_original(&kvm, &mut cov);
    let Some(khz) = original.vcpu_state.tsc_khz else {
        eprintln!("skipping: this KVM does not report the TSC frequency (KVM_CAP_GET_TSC_KHZ)");
        return;
    };
    let mut state = original.vcpu_state.clone();
    let wanted = khz - khz / 100; // 1% slower: beyond the tolerance
    state.tsc_khz = Some(wanted);
    let (vm, _) = new_vm(&kvm, &original.mem, original.with_devices);
    let vcpu = vm.create_vcpu(0).unwrap();
    match state.restore(&vm, &vcpu) {
        Ok(()) => {
            assert_eq!(vcpu.get_tsc_khz().unwrap(), wanted);
            eprintln!("covered: KVM_SET_TSC_KHZ {khz} -> {wanted} kHz");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("KVM_CAP_TSC_CONTROL") || msg.contains("KVM_SET_TSC_KHZ"),
                "a refused TSC frequency is reported as such: {msg}"
            );
            eprintln!("skipping part: TSC scaling refused by this KVM: {msg}");
        }
    }
}

trait ReadVec {
    fn read_slice_to_vec(&self, addr: u64, len: usize) -> Vec<u8>;
}

impl ReadVec for GuestMemoryMmap {
    fn read_slice_to_vec(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
