//! cargo-fuzz target: the fuzzer's bytes choose a guest memory layout, then hostile descriptor
//! chains, queue layouts and available rings, or MMIO register sequences, run against the
//! chain walker, the console and 9p devices and the virtio-mmio transport (see
//! `vmm::devices::virtio::fuzz`). Every violated oracle is a crash; so is any panic, on any
//! thread.
//!
//! Run: `cd vmm/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_chain -- -max_total_time=60`

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm::devices::virtio::fuzz::run_bytes(data) {
        panic!("{e}");
    }
});
