//! The address buses (port I/O and MMIO) that route a vCPU's exits to device models.
//!
//! A bus owns only the mapping from address ranges to devices; it knows nothing about KVM.
//! Lookups are a binary search over non-overlapping ranges, so dispatch costs O(log n) with no
//! lock: the bus is built before the vCPUs start and is immutable afterwards.

use std::sync::Arc;

/// A device model reachable through a bus. Implementations do their own interior locking,
/// because several vCPU threads may access one device concurrently.
pub trait BusDevice: Send + Sync {
    /// A guest read of `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` from the start of the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors while assembling a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or wraps around the address space")]
    BadRange { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone)]
struct Range {
    base: u64,
    len: u64,
    name: &'static str,
    device: Arc<dyn BusDevice>,
}

/// An immutable-after-setup set of non-overlapping device ranges.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<Range>,
}

/// The device found for an address, with the offset into its range.
pub struct Resolved<'a> {
    pub device: &'a Arc<dyn BusDevice>,
    pub name: &'static str,
    pub base: u64,
    pub offset: u64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`; `name` labels it in stats and errors.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &'static str,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let idx = self.ranges.partition_point(|r| r.base < base);
        let overlaps_prev = idx > 0 && {
            let prev = &self.ranges[idx - 1];
            prev.base + prev.len > base
        };
        let overlaps_next = self.ranges.get(idx).is_some_and(|next| next.base < end);
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(
            idx,
            Range {
                base,
                len,
                name,
                device,
            },
        );
        crate::internal_check!(
            self.ranges
                .windows(2)
                .all(|w| w[0].base + w[0].len <= w[1].base),
            "bus ranges out of order or overlapping after inserting {name} at {base:#x}"
        );
        Ok(())
    }

    /// Finds the device whose range contains `addr`.
    pub fn resolve(&self, addr: u64) -> Option<Resolved<'_>> {
        let idx = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(idx.checked_sub(1)?)?;
        (addr - range.base < range.len).then_some(Resolved {
            device: &range.device,
            name: range.name,
            base: range.base,
            offset: addr - range.base,
        })
    }

    /// Dispatches a read; returns false (leaving `data` untouched) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some(r) => {
                r.device.read(r.offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some(r) => {
                r.device.write(r.offset, data);
                true
            }
            None => false,
        }
    }

    /// The labels of the mapped ranges, in address order.
    pub fn names(&self) -> impl Iterator<Item = (&'static str, u64, u64)> + '_ {
        self.ranges.iter().map(|r| (r.name, r.base, r.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_to_the_right_device_with_relative_offsets() {
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, "serial", a.clone()).unwrap();
        bus.insert(0x60, 1, "i8042-data", b.clone()).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        assert!(bus.write(0x60, &[1, 2]));
        assert!(!bus.write(0x400, &[0]));
        assert!(!bus.write(0x5f, &[0]));
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3ff, &mut buf));
        assert_eq!(buf, [7]);
        assert_eq!(*a.0.lock().unwrap(), vec![(2, vec![7])]);
        assert_eq!(*b.0.lock().unwrap(), vec![(0, vec![1, 2])]);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let d: Arc<dyn BusDevice> = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, "a", d.clone()).unwrap();
        assert_eq!(
            bus.insert(0x10f, 1, "b", d.clone()),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf8, 0x9, "c", d.clone()),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert_eq!(
            bus.insert(0x200, 0, "d", d.clone()),
            Err(BusError::BadRange {
                base: 0x200,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, "e", d.clone()),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(0x110, 0x10, "adjacent", d).unwrap();
        assert_eq!(bus.resolve(0x110).unwrap().name, "adjacent");
        assert_eq!(bus.resolve(0x10f).unwrap().name, "a");
    }
}
