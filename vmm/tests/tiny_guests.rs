//! Tiny hand-made guests run on this machine's /dev/kvm through the public `Vm` API: a PVH ELF
//! "kernel" (32-bit entry), an ELF without PVH note (64-bit entry with page tables and zero
//! page) and a minimal bzImage. They exercise the real loader, boot structures, register setup,
//! serial capture, the exit/phase ports, unmapped MMIO, reset, timeout and stop. Each test skips
//! (saying why) only when /dev/kvm cannot be opened.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tempfile::NamedTempFile;
use vmm::{ConsoleSink, GuestExit, InitrdPart, PhaseLog, Vm, VmConfig, VmError};

const LOAD_ADDR: u64 = 0x10_0000;

fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: cannot open /dev/kvm: {e}");
            false
        }
    }
}

/// A tiny x86 assembler for the handful of instructions the guests use. `mov dx, imm16` etc.
/// are encoded for 32-bit mode; the same bytes mean the same in 64-bit mode.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn out(mut self, port: u16, value: u8) -> Self {
        self.0.extend_from_slice(&[0x66, 0xba]);
        self.0.extend_from_slice(&port.to_le_bytes());
        self.0.extend_from_slice(&[0xb0, value, 0xee]);
        self
    }
    fn serial(mut self, text: &[u8]) -> Self {
        for b in text {
            self = self.out(0x3f8, *b);
        }
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// Unless the preceding compare was equal, report `status` on the exit port.
    fn fail_unless_equal(self, status: u8) -> Self {
        let bail = Asm::default().out(0x600, status).0;
        self.raw(&[0x74, bail.len() as u8]).raw(&bail)
    }
    fn halt_forever(self) -> Self {
        self.raw(&[0xf4, 0xeb, 0xfd])
    }
}

fn push_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// An ELF64 executable with `code` loaded at 1 MiB; with `pvh`, a Xen PHYS32_ENTRY note
/// pointing at the code.
fn elf_kernel(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off = 0x1000u64;
    let note_off = 0x800u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    push_u16(&mut f, 2); // ET_EXEC
    push_u16(&mut f, 0x3e); // x86-64
    push_u32(&mut f, 1);
    push_u64(&mut f, LOAD_ADDR); // e_entry
    push_u64(&mut f, 64); // e_phoff
    push_u64(&mut f, 0); // e_shoff
    push_u32(&mut f, 0);
    push_u16(&mut f, 64);
    push_u16(&mut f, 56);
    push_u16(&mut f, phnum);
    push_u16(&mut f, 64);
    push_u16(&mut f, 0);
    push_u16(&mut f, 0);
    // PT_LOAD
    push_u32(&mut f, 1);
    push_u32(&mut f, 5);
    push_u64(&mut f, code_off);
    push_u64(&mut f, LOAD_ADDR);
    push_u64(&mut f, LOAD_ADDR);
    push_u64(&mut f, code.len() as u64);
    push_u64(&mut f, code.len() as u64 + 0x1000); // some bss
    push_u64(&mut f, 0x1000);
    let mut note = Vec::new();
    push_u32(&mut note, 4); // namesz
    push_u32(&mut note, 8); // descsz
    push_u32(&mut note, 18); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    push_u64(&mut note, LOAD_ADDR);
    if pvh {
        push_u32(&mut f, 4); // PT_NOTE
        push_u32(&mut f, 4);
        push_u64(&mut f, note_off);
        push_u64(&mut f, 0);
        push_u64(&mut f, 0);
        push_u64(&mut f, note.len() as u64);
        push_u64(&mut f, note.len() as u64);
        push_u64(&mut f, 4);
    }
    f.resize(note_off as usize, 0);
    f.extend_from_slice(&note);
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

/// A minimal bzImage: one setup sector with a boot-protocol 2.15 header, then the
/// "protected-mode kernel" whose 64-bit entry is at offset 0x200.
fn bzimage_kernel(code64: &[u8], init_size: u32) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let mut kernel = vec![0xf4u8; 0x200]; // hlt sled before startup_64
    kernel.extend_from_slice(code64);
    f.extend_from_slice(&kernel);
    f
}

/// A temporary file holding `bytes`, removed when dropped.
fn temp_file(tag: &str, bytes: &[u8]) -> NamedTempFile {
    let mut f = tempfile::Builder::new()
        .prefix(&format!("vmm-tiny-{tag}-"))
        .tempfile()
        .unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

fn config(kernel: &NamedTempFile, cmdline: &str) -> VmConfig {
    let mut c = VmConfig::new(kernel.path(), cmdline);
    c.mem_mib = 64;
    c.console = ConsoleSink::Capture;
    c.timeout = Some(Duration::from_secs(60));
    c
}

fn run(c: VmConfig) -> Result<vmm::RunOutcome, VmError> {
    Vm::new(c, PhaseLog::new(Instant::now()))?.run()
}

/// The PVH guest: phase 1, "hi\n", checks the start info magic, prints the first two initrd
/// bytes and the first two command-line bytes, touches unmapped MMIO, phase 3, exit 42.
fn pvh_guest_code() -> Vec<u8> {
    Asm::default()
        .out(0x610, 1)
        .serial(b"hi\n")
        .raw(&[0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]) // cmp dword [ebx], 0x336ec578
        .fail_unless_equal(99)
        .raw(&[0x66, 0xba, 0xf8, 0x03]) // mov dx, 0x3f8
        .raw(&[0x8b, 0x73, 0x10, 0x8b, 0x36]) // mov esi, [ebx+16]; mov esi, [esi]
        .raw(&[0x8a, 0x06, 0xee, 0x8a, 0x46, 0x01, 0xee]) // out [esi], [esi+1]
        .raw(&[0x8b, 0x73, 0x18]) // mov esi, [ebx+24]
        .raw(&[0x8a, 0x06, 0xee, 0x8a, 0x46, 0x01, 0xee])
        .raw(&[0xa1, 0x00, 0x00, 0x00, 0xe0]) // mov eax, [0xe0000000]
        .raw(&[0xa3, 0x00, 0x10, 0x00, 0xe0]) // mov [0xe0001000], eax
        .raw(&[0x3d, 0xff, 0xff, 0xff, 0xff]) // cmp eax, 0xffffffff
        .fail_unless_equal(98)
        .out(0x610, 3)
        .out(0x600, 42)
        .halt_forever()
        .0
}

#[test]
fn pvh_elf_guest_runs_end_to_end() {
    if !kvm_available() {
        return;
    }
    let kernel = temp_file("pvh", &elf_kernel(&pvh_guest_code(), true));
    let part = temp_file("initrd-part", b"o");
    let mut c = config(&kernel, "AB console=ttyS0");
    c.initrd = vec![
        InitrdPart::File(part.path().to_path_buf()),
        InitrdPart::Bytes(b"k-rest".to_vec()),
    ];
    c.stats = true;
    c.vcpus = 2;
    let out = run(c).unwrap();
    assert_eq!(out.exit, GuestExit::Status(42));
    assert_eq!(String::from_utf8_lossy(&out.console_output), "hi\nokAB");
    assert_eq!(out.console_tail, vec!["hi".to_string(), "okAB".to_string()]);
    let events = out.phases.events();
    let guest: Vec<_> = events
        .iter()
        .filter(|e| e.guest)
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(guest, ["init started", "job started"]);
    let host: Vec<_> = events
        .iter()
        .filter(|e| !e.guest)
        .map(|e| e.name.to_string())
        .collect();
    for name in [
        "kvm opened",
        "kvm vm created",
        "memory ready",
        "kvm devices created",
        "kernel loaded",
        "initrd loaded",
        "first KVM_RUN",
        "first console byte",
        "vm exit",
    ] {
        assert!(
            host.iter().any(|h| h == name),
            "missing phase {name}: {host:?}"
        );
    }
    let at = |n: &str| out.phases.get(n).unwrap();
    // Guest memory is registered before the irqchip exists (registering it afterwards waits
    // in KVM on some hosts).
    assert!(at("kvm opened") <= at("kvm vm created"));
    assert!(at("memory ready") <= at("kvm devices created"));
    assert!(at("kernel loaded") <= at("first KVM_RUN"));
    assert!(at("first KVM_RUN") <= at("init started"));
    assert!(at("init started") <= at("first console byte"));
    assert!(at("job started") <= at("vm exit"));
    let stats = out.stats.unwrap();
    assert_eq!(stats.device_count("unmapped mmio"), 2);
    assert_eq!(stats.device_count("serial"), 7);
    assert_eq!(stats.device_count("exit-port"), 1);
    assert_eq!(stats.device_count("phase-port"), 2);
    assert!(stats.to_string().contains("mmio-read"));
    assert!(!out.kvm_hardware || vmm::kvm_is_hardware_accelerated());
}

/// Loading and running are separate steps: after `load` the kernel is in memory and nothing
/// has run; `run` on the ready VM then boots it.
#[test]
fn loading_and_running_are_separate_steps() {
    if !kvm_available() {
        return;
    }
    let kernel = temp_file("steps", &elf_kernel(&pvh_guest_code(), true));
    let phases = PhaseLog::new(Instant::now());
    let vm = Vm::new(config(&kernel, "AB"), phases.clone()).unwrap();
    let ready = vm.load().unwrap();
    assert!(phases.get("kernel loaded").is_some());
    assert!(
        phases.get("first KVM_RUN").is_none(),
        "nothing runs before run()"
    );
    let out = ready.run().unwrap();
    assert_eq!(out.exit, GuestExit::Status(42));
    assert!(phases.get("first KVM_RUN").is_some());
}

#[test]
fn long_mode_elf_guest_gets_the_zero_page() {
    if !kvm_available() {
        return;
    }
    let code = Asm::default()
        // cmp dword [rsi+0x202], "HdrS"
        .raw(&[0x81, 0xbe, 0x02, 0x02, 0x00, 0x00])
        .raw(b"HdrS")
        .fail_unless_equal(97)
        // cmp byte [rsi+0x210], 0xff (type_of_loader)
        .raw(&[0x80, 0xbe, 0x10, 0x02, 0x00, 0x00, 0xff])
        .fail_unless_equal(96)
        // cmp byte [rsi+0x1e8], 3 (e820 entries)
        .raw(&[0x80, 0xbe, 0xe8, 0x01, 0x00, 0x00, 0x03])
        .fail_unless_equal(95)
        .serial(b"64\n")
        .out(0x600, 7)
        .halt_forever()
        .0;
    let kernel = temp_file("elf64", &elf_kernel(&code, false));
    let out = run(config(&kernel, "console=ttyS0")).unwrap();
    assert_eq!(out.exit, GuestExit::Status(7));
    assert_eq!(out.console_output, b"64\n");
}

#[test]
fn bzimage_guest_keeps_its_setup_header() {
    if !kvm_available() {
        return;
    }
    let code = Asm::default()
        .raw(&[0x80, 0xbe, 0xf1, 0x01, 0x00, 0x00, 0x01]) // cmp byte [rsi+0x1f1], 1
        .fail_unless_equal(94)
        .out(0x600, 5)
        .halt_forever()
        .0;
    let kernel = temp_file("bz", &bzimage_kernel(&code, 0x1000));
    let out = run(config(&kernel, "console=ttyS0")).unwrap();
    assert_eq!(out.exit, GuestExit::Status(5));
}

#[test]
fn bzimage_decompression_area_is_kept_free_of_the_initrd() {
    if !kvm_available() {
        return;
    }
    let code = Asm::default().out(0x600, 6).halt_forever().0;
    // 1 MiB load address + 24 MiB init_size + an 8 MiB initrd do not fit in 32 MiB ...
    let kernel = temp_file("bz-big", &bzimage_kernel(&code, 24 << 20));
    let mut c = config(&kernel, "");
    c.mem_mib = 32;
    c.initrd = vec![InitrdPart::Bytes(vec![0; 8 << 20])];
    let err = run(c.clone()).unwrap_err();
    assert!(matches!(err, VmError::InitrdTooLarge { .. }), "{err}");
    // ... but do in 40 MiB.
    c.mem_mib = 40;
    assert_eq!(run(c).unwrap().exit, GuestExit::Status(6));
}

#[test]
fn memory_above_the_mmio_gap_is_in_the_pvh_memory_map() {
    if !kvm_available() {
        return;
    }
    // Exit status = hvm_start_info.memmap_entries.
    let code = Asm::default()
        .raw(&[0x8b, 0x43, 0x30]) // mov eax, [ebx+0x30]
        .raw(&[0x66, 0xba, 0x00, 0x06, 0xee]) // mov dx, 0x600; out dx, al
        .halt_forever()
        .0;
    let kernel = temp_file("split", &elf_kernel(&code, true));
    let mut c = config(&kernel, "");
    c.mem_mib = 4096;
    // Low RAM, EBDA/BIOS reserved, RAM up to the gap, RAM from 4 GiB.
    assert_eq!(run(c.clone()).unwrap().exit, GuestExit::Status(4));
    c.mem_mib = 1024;
    assert_eq!(run(c).unwrap().exit, GuestExit::Status(3));
}

#[test]
fn i8042_reset_ends_the_run() {
    if !kvm_available() {
        return;
    }
    let code = Asm::default()
        .serial(b"bye")
        .out(0x64, 0xfe)
        .halt_forever()
        .0;
    let kernel = temp_file("reset", &elf_kernel(&code, true));
    let out = run(config(&kernel, "")).unwrap();
    assert_eq!(out.exit, GuestExit::Reset);
    assert_eq!(out.console_tail, vec!["bye".to_string()]);
}

#[test]
fn halted_guest_runs_into_the_timeout() {
    if !kvm_available() {
        return;
    }
    // cli; hlt: with the in-kernel irqchip KVM keeps the vCPU halted, so only the timeout ends it.
    let code = Asm::default().serial(b"zz").raw(&[0xfa]).halt_forever().0;
    let kernel = temp_file("hlt", &elf_kernel(&code, true));
    let mut c = config(&kernel, "");
    c.timeout = Some(Duration::from_millis(300));
    let out = run(c).unwrap();
    assert_eq!(out.exit, GuestExit::Timeout);
    assert_eq!(out.console_output, b"zz");
}

#[test]
fn stop_handle_ends_a_spinning_guest() {
    if !kvm_available() {
        return;
    }
    let code = Asm::default().out(0x610, 1).raw(&[0xeb, 0xfe]).0; // jmp $
    let kernel = temp_file("spin", &elf_kernel(&code, true));
    let mut c = config(&kernel, "");
    c.vcpus = 2;
    let vm = Vm::new(c, PhaseLog::new(Instant::now())).unwrap();
    let stop = vm.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        stop.stop();
    });
    let out = vm.run().unwrap();
    stopper.join().unwrap();
    assert_eq!(out.exit, GuestExit::Stopped);
}

#[test]
fn triple_fault_is_reported_with_the_location() {
    if !kvm_available() {
        return;
    }
    // ud2 with an IDT of one not-present gate: #UD -> #NP -> #DF -> shutdown.
    let code = Asm::default().raw(&[0x0f, 0x0b]).0;
    let kernel = temp_file("ud2", &elf_kernel(&code, true));
    let vm = Vm::new(config(&kernel, ""), PhaseLog::new(Instant::now())).unwrap();
    let console = vm.console_handle();
    let err = vm.run().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmError::TripleFault { .. }), "{msg}");
    assert!(msg.contains("vCPU 0 at RIP"), "{msg}");
    assert!(console.tail().is_empty());
}

#[test]
fn not_a_kernel_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let kernel = temp_file("junk", b"this is not a kernel, just some text\n");
    let err = run(config(&kernel, "")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmError::BadKernel { .. }), "{msg}");
    assert!(
        msg.contains("vmm-tiny-junk") && msg.contains("bzImage"),
        "{msg}"
    );
}

#[test]
fn initrd_that_does_not_fit_says_how_much_memory_is_needed() {
    if !kvm_available() {
        return;
    }
    let kernel = temp_file("small", &elf_kernel(&[0xf4], true));
    let mut c = config(&kernel, "");
    c.mem_mib = 32;
    c.initrd = vec![InitrdPart::Bytes(vec![0; 40 << 20])];
    let err = run(c).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmError::InitrdTooLarge { .. }), "{msg}");
    assert!(msg.contains("at least 43 MiB"), "{msg}");
}

// --- Guests under the sandbox ------------------------------------------------------------------
//
// The sandbox is for good once installed, so these run in a child process: the test binary
// runs itself again with SANDBOXED_CHILD set, and the parent judges the result.

/// Set in the child: the scratch directory shared with the guest.
const SANDBOXED_CHILD: &str = "VMM_TINY_GUEST_SANDBOXED_SHARE";

impl Asm {
    /// mov dword [addr], value
    fn store32(self, addr: u32, value: u32) -> Self {
        let mut b = vec![0xc7, 0x05];
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&value.to_le_bytes());
        self.raw(&b)
    }
    /// mov word [addr], value
    fn store16(self, addr: u32, value: u16) -> Self {
        let mut b = vec![0x66, 0xc7, 0x05];
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&value.to_le_bytes());
        self.raw(&b)
    }
    /// Spins until the word at `addr` equals `value` (cmp word [addr], value; jne back).
    fn wait16(self, addr: u32, value: u16) -> Self {
        let mut b = vec![0x66, 0x81, 0x3d];
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&value.to_le_bytes());
        b.extend_from_slice(&[0x75, (-(b.len() as i8) - 2) as u8]);
        self.raw(&b)
    }
    /// Reports `status` unless the dword at `addr` equals `value`.
    fn expect32(self, addr: u32, value: u32, status: u8) -> Self {
        let mut b = vec![0xa1]; // mov eax, [addr]
        b.extend_from_slice(&addr.to_le_bytes());
        b.push(0x3d); // cmp eax, value
        b.extend_from_slice(&value.to_le_bytes());
        self.raw(&b).fail_unless_equal(status)
    }
    /// Reports `status` unless the byte at `addr` equals `value`.
    fn expect8(self, addr: u32, value: u8, status: u8) -> Self {
        let mut b = vec![0x80, 0x3d];
        b.extend_from_slice(&addr.to_le_bytes());
        b.push(value);
        self.raw(&b).fail_unless_equal(status)
    }
}

/// A PVH guest that drives a virtio-9p device in MMIO slot 0 like a tiny driver: it sets the
/// device up (the vCPU thread then starts the device thread), sends `requests` one at a time,
/// checks each reply's type against `replies`, prints the data of the reply at `print_reply`
/// (an Rread) on the serial port and exits with 42.
fn virtio_9p_guest(requests: &[Vec<u8>], replies: &[u8], print_reply: usize) -> Vec<u8> {
    const REGS: u32 = vmm::boot::layout::VIRTIO_MMIO_BASE as u32;
    const DATA: u32 = LOAD_ADDR as u32 + 0x2000; // descriptor table, then the available ring
    const AVAIL: u32 = DATA + 0x100;
    const REQUESTS: u32 = DATA + 0x200;
    const USED: u32 = 0x20_0000;
    const REPLIES: u32 = 0x21_0000;
    const REPLY_LEN: u32 = 0x1000;
    const QUEUE: u16 = 16;
    assert!(requests.len() <= usize::from(QUEUE) / 2);
    let reg = |off: u32| REGS + off;
    let mut asm = Asm::default()
        .store32(reg(0x70), 1) // ACKNOWLEDGE
        .store32(reg(0x70), 3) // DRIVER
        .store32(reg(0x24), 0)
        .store32(reg(0x20), 1) // VIRTIO_9P_MOUNT_TAG
        .store32(reg(0x24), 1)
        .store32(reg(0x20), 1) // VIRTIO_F_VERSION_1
        .store32(reg(0x70), 11) // FEATURES_OK
        .store32(reg(0x30), 0)
        .store32(reg(0x38), u32::from(QUEUE))
        .store32(reg(0x80), DATA)
        .store32(reg(0x90), AVAIL)
        .store32(reg(0xa0), USED)
        .store32(reg(0x44), 1)
        .store32(reg(0x70), 15) // DRIVER_OK: the device thread starts
        .expect32(reg(0x70), 15, 70);
    for (i, &reply_type) in replies.iter().enumerate() {
        let n = i as u16 + 1;
        asm = asm
            .store16(AVAIL + 2, n)
            .store32(reg(0x50), 0) // QueueNotify (the ioeventfd)
            .wait16(USED + 2, n)
            .expect8(REPLIES + i as u32 * REPLY_LEN + 4, reply_type, 71 + i as u8);
    }
    let data = REPLIES + print_reply as u32 * REPLY_LEN + 11; // size[4] type[1] tag[2] count[4]
    let mut print = vec![0x8b, 0x0d]; // mov ecx, [count]
    print.extend_from_slice(&(data - 4).to_le_bytes());
    print.push(0xbe); // mov esi, data
    print.extend_from_slice(&data.to_le_bytes());
    print.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xfc, 0xf3, 0x6e]); // mov dx, 0x3f8; cld; rep outsb
    let mut image = asm.raw(&print).out(0x600, 42).halt_forever().0;
    assert!(image.len() <= 0x2000, "guest code too long");
    image.resize(0x2000, 0);

    // Descriptor table: request i is the chain 2i (device-readable) -> 2i+1 (device-writable).
    let mut table = Vec::new();
    let mut request_area = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let addr = REQUESTS + request_area.len() as u32;
        request_area.extend_from_slice(request);
        request_area.resize(request_area.len().next_multiple_of(8), 0);
        for (addr, len, flags, next) in [
            (addr, request.len() as u32, 1u16, 2 * i as u16 + 1), // NEXT
            (REPLIES + i as u32 * REPLY_LEN, REPLY_LEN, 2, 0),    // WRITE
        ] {
            push_u64(&mut table, u64::from(addr));
            push_u32(&mut table, len);
            push_u16(&mut table, flags);
            push_u16(&mut table, next);
        }
    }
    table.resize(0x100, 0);
    let mut avail = vec![0u8; 4]; // flags, idx (the guest bumps idx)
    for i in 0..requests.len() {
        push_u16(&mut avail, 2 * i as u16);
    }
    avail.resize(0x100, 0);
    image.extend_from_slice(&table);
    image.extend_from_slice(&avail);
    image.extend_from_slice(&request_area);
    image
}

/// The child: confine the process, boot the 9p guest with a share of `dir`, report.
fn sandboxed_9p_child(dir: PathBuf) -> ! {
    use p9::wire::{msg, Tmessage, WalkNames, NOFID, NOTAG};
    let requests: Vec<Vec<u8>> = [
        (
            NOTAG,
            Tmessage::Version {
                msize: 8192,
                version: b"9P2000.L",
            },
        ),
        (
            1,
            Tmessage::Attach {
                fid: 1,
                afid: NOFID,
                uname: b"",
                aname: b"",
                n_uname: 0,
            },
        ),
        (
            2,
            Tmessage::Walk {
                fid: 1,
                newfid: 2,
                names: WalkNames::new(&[b"hello.txt"]).unwrap(),
            },
        ),
        (3, Tmessage::Lopen { fid: 2, flags: 0 }),
        (
            4,
            Tmessage::Read {
                fid: 2,
                offset: 0,
                count: 256,
            },
        ),
        (
            5,
            Tmessage::Walk {
                fid: 1,
                newfid: 3,
                names: WalkNames::new(&[]).unwrap(),
            },
        ),
        (
            6,
            Tmessage::Lcreate {
                fid: 3,
                name: b"created.txt",
                flags: 0o101,
                mode: 0o644,
                gid: 0,
            },
        ),
        (
            7,
            Tmessage::Write {
                fid: 3,
                offset: 0,
                data: b"written by the guest",
            },
        ),
    ]
    .iter()
    .map(|(tag, m)| {
        let mut out = Vec::new();
        m.encode(*tag, &mut out);
        out
    })
    .collect();
    let replies = [
        msg::RVERSION,
        msg::RATTACH,
        msg::RWALK,
        msg::RLOPEN,
        msg::RREAD,
        msg::RWALK,
        msg::RLCREATE,
        msg::RWRITE,
    ];
    let kernel = temp_file(
        "sandboxed-9p",
        &elf_kernel(&virtio_9p_guest(&requests, &replies, 4), true),
    );
    let report = vmm::sandbox::install(
        &vmm::sandbox::Policy::new()
            .read_file(kernel.path())
            .share(&dir, true),
    )
    .unwrap();
    println!("sandbox: {report:?}");
    let vm_and_run = || -> Result<vmm::RunOutcome, String> {
        let mut vm = Vm::new(config(&kernel, ""), PhaseLog::new(Instant::now()))
            .map_err(|e| e.to_string())?;
        let server = p9::Server::new(&dir, p9::Config::default()).map_err(|e| e.to_string())?;
        let pool = std::sync::Arc::new(vmm::devices::virtio::fs9p::worker_pool(
            2,
            "9p-worker",
            false,
        ));
        let device = vmm::devices::virtio::Virtio9p::new("share", server, pool)
            .map_err(|e| e.to_string())?;
        let (base, _) = vm
            .add_virtio_device("virtio-9p", Box::new(device))
            .map_err(|e| e.to_string())?;
        assert_eq!(base, vmm::boot::layout::VIRTIO_MMIO_BASE);
        vm.run().map_err(|e| e.to_string())
    };
    match vm_and_run() {
        Ok(out) => {
            println!("exit: {:?}", out.exit);
            println!("console: {}", String::from_utf8_lossy(&out.console_output));
            // Read after the run, under the main thread's filter and Landlock.
            println!("resident: {:?}", out.guest_resident_kib.is_some());
            std::process::exit(0)
        }
        Err(e) => {
            println!("run failed: {e}");
            std::process::exit(1)
        }
    }
}

#[test]
fn a_sandboxed_guest_drives_virtio_9p_through_confined_threads() {
    if let Some(dir) = std::env::var_os(SANDBOXED_CHILD) {
        sandboxed_9p_child(PathBuf::from(dir));
    }
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("vmm-tiny-sandboxed-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("hello.txt"), "hello from the share\n").unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_sandboxed_guest_drives_virtio_9p_through_confined_threads",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SANDBOXED_CHILD, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let created = std::fs::read_to_string(dir.join("created.txt"));
    drop(tmp);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("exit: Status(42)"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("console: hello from the share"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("resident: true"), "{stdout}\n{stderr}");
    assert_eq!(created.unwrap(), "written by the guest");
    if stdout.contains("seccomp: false") {
        eprintln!("note: this kernel has no seccomp filters; only Landlock was exercised");
    }
}
