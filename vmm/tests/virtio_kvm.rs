//! The virtio-mmio transport on real KVM: `register` wires an ioeventfd and an irqfd, and a
//! tiny real-mode guest's 32-bit write to QueueNotify reaches the console device through the
//! ioeventfd alone (the vCPU never exits for it). Skips, saying why, when /dev/kvm is missing.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::{MmioTransport, VirtioConsole, VirtioError};

const BASE: u64 = 0x2_0000;
const MEM: usize = 0x1_0000;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn w32(t: &MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r32(t: &MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn guest_notify_reaches_the_device_through_ioeventfd() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipping: cannot open /dev/kvm: {e}");
            return;
        }
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: `host` is the start of a live mapping of MEM bytes owned by `mem`, which outlives
    // the VM in this test; slot 0 is not used otherwise.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: host as u64,
        })
        .unwrap();
    }

    let sink = Sink::default();
    let t = MmioTransport::new(
        Box::new(VirtioConsole::new(Box::new(sink.clone()))),
        mem.clone(),
    )
    .unwrap();
    t.register(&vm, BASE, 5).unwrap();
    // A second device on the same notify address and queue index is refused, with a reason.
    let clash = MmioTransport::new(
        Box::new(VirtioConsole::new(Box::new(Sink::default()))),
        mem.clone(),
    )
    .unwrap();
    assert!(matches!(
        clash.register(&vm, BASE, 6),
        Err(VirtioError::Register { .. })
    ));

    // Driver side, from the host: negotiate, transmit queue 1 of 16 at 0x4000/0x5000/0x6000.
    for s in [1u32, 3] {
        w32(&t, 0x70, s);
    }
    w32(&t, 0x24, 1);
    w32(&t, 0x20, 1); // VIRTIO_F_VERSION_1
    w32(&t, 0x70, 11);
    assert_eq!(r32(&t, 0x70), 11);
    w32(&t, 0x30, 1);
    w32(&t, 0x38, 16);
    w32(&t, 0x80, 0x4000);
    w32(&t, 0x90, 0x5000);
    w32(&t, 0xa0, 0x6000);
    w32(&t, 0x44, 1);
    w32(&t, 0x70, 15);
    assert_eq!(r32(&t, 0x70), 15);
    let text = b"hello through ioeventfd";
    mem.write_slice(text, GuestAddress(0x8000)).unwrap();
    mem.write_obj(0x8000u64, GuestAddress(0x4000)).unwrap();
    mem.write_obj(text.len() as u32, GuestAddress(0x4008))
        .unwrap();
    mem.write_obj(0u16, GuestAddress(0x5004)).unwrap(); // avail ring[0] = head 0
    mem.write_obj(1u16, GuestAddress(0x5002)).unwrap(); // avail idx = 1

    // Guest: mov ax, BASE >> 4; mov ds, ax; mov eax, 1; mov [0x50], eax; out 0x80, al; hlt
    // (with an in-kernel irqchip hlt does not exit, so the port write ends the run)
    let code = [
        0xb8, 0x00, 0x20, 0x8e, 0xd8, 0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x66, 0xa3, 0x50, 0x00,
        0xe6, 0x80, 0xf4,
    ];
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    match vcpu.run().unwrap() {
        VcpuExit::IoOut(0x80, _) => {}
        VcpuExit::MmioWrite(addr, data) => {
            panic!("notify write at {addr:#x} ({data:?}) exited instead of hitting the ioeventfd")
        }
        other => panic!("unexpected exit {other:?}"),
    }
    let start = Instant::now();
    while sink.0.lock().unwrap().as_slice() != text {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "console got {:?}",
            String::from_utf8_lossy(&sink.0.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let used: u16 = mem.read_obj(GuestAddress(0x6002)).unwrap();
    assert_eq!(used, 1);
}
