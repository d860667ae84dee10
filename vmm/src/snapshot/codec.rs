//! Little-endian encoding of snapshot state: a growable [`Encoder`] and a bounds-checked
//! [`Decoder`] that turns every short or malformed input into a [`DecodeError`], never a
//! panic. KVM's state structs are plain old data; they go through zerocopy's byte views
//! (derived by kvm-bindings' `serde` feature), so no unsafe cast is written here. The layout
//! is that of x86-64, the only architecture the monitor runs on.

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Where and why a state section could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}: {problem}")]
pub struct DecodeError {
    /// The field being read, e.g. "vCPU 0 MSR count".
    pub what: String,
    /// What was wrong with it.
    pub problem: String,
}

impl DecodeError {
    pub(crate) fn new(what: impl Into<String>, problem: impl Into<String>) -> Self {
        DecodeError {
            what: what.into(),
            problem: problem.into(),
        }
    }
}

/// Appends fields to a byte buffer in little-endian order.
#[derive(Default)]
pub struct Encoder {
    bytes: Vec<u8>,
}

impl Encoder {
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A length-prefixed byte string (u64 length).
    pub fn blob(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.bytes.extend_from_slice(bytes);
    }

    /// A plain-old-data struct, as its in-memory bytes (fixed length, no prefix).
    pub fn pod<T: IntoBytes + Immutable>(&mut self, value: &T) {
        self.bytes.extend_from_slice(value.as_bytes());
    }

    /// A length-prefixed (u32 count) list of plain-old-data structs.
    pub fn pod_list<T: IntoBytes + Immutable>(&mut self, values: &[T]) {
        self.u32(values.len() as u32);
        for value in values {
            self.pod(value);
        }
    }

    /// `None` as a 0 byte, `Some(v)` as a 1 byte followed by `v` written by `put`.
    pub fn option<T>(&mut self, value: Option<&T>, put: impl FnOnce(&mut Self, &T)) {
        match value {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                put(self, v);
            }
        }
    }
}

/// Reads fields written by [`Encoder`] from a byte slice, checking every length against
/// what is left before reading or allocating.
pub struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Decoder { bytes, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Fails unless every byte was consumed (trailing bytes mean a mismatched layout).
    pub fn finish(&self, what: &str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::new(
                what,
                format!("{n} unexpected trailing bytes"),
            )),
        }
    }

    pub fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::new(
                what,
                format!(
                    "needs {len} bytes at offset {} but only {} remain",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A byte string written by [`Encoder::blob`].
    pub fn blob(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .map_err(|_| DecodeError::new(what, format!("length {len} does not fit memory")))?;
        self.take(len, what)
    }

    pub fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T, DecodeError> {
        let bytes = self.take(std::mem::size_of::<T>(), what)?;
        T::read_from_bytes(bytes)
            .map_err(|_| DecodeError::new(what, "has the wrong size for its type"))
    }

    /// A list written by [`Encoder::pod_list`] of at most `max` entries.
    pub fn pod_list<T: FromBytes>(
        &mut self,
        max: usize,
        what: &str,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.u32(what)? as usize;
        if count > max {
            return Err(DecodeError::new(
                what,
                format!("{count} entries, more than the {max} allowed"),
            ));
        }
        let size = std::mem::size_of::<T>();
        if count.saturating_mul(size) > self.remaining() {
            return Err(DecodeError::new(
                what,
                format!(
                    "{count} entries do not fit the {} bytes left",
                    self.remaining()
                ),
            ));
        }
        (0..count).map(|_| self.pod(what)).collect()
    }

    /// An optional value written by [`Encoder::option`].
    pub fn option<T>(
        &mut self,
        what: &str,
        get: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => get(self).map(Some),
            tag => Err(DecodeError::new(
                what,
                format!("presence tag is {tag}, not 0 or 1"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_msr_entry;

    #[test]
    fn fields_round_trip() {
        let mut e = Encoder::default();
        e.u8(7);
        e.u32(0xdead_beef);
        e.u64(u64::MAX - 1);
        e.blob(b"abc");
        let msr = kvm_msr_entry {
            index: 0x10,
            data: 42,
            ..Default::default()
        };
        e.pod_list(&[msr, msr]);
        e.option(Some(&5u32), |e, v| e.u32(*v));
        e.option(None::<&u32>, |e, v| e.u32(*v));
        let bytes = e.into_bytes();
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.u8("a").unwrap(), 7);
        assert_eq!(d.u32("b").unwrap(), 0xdead_beef);
        assert_eq!(d.u64("c").unwrap(), u64::MAX - 1);
        assert_eq!(d.blob("d").unwrap(), b"abc");
        assert_eq!(d.pod_list::<kvm_msr_entry>(4, "e").unwrap(), vec![msr, msr]);
        assert_eq!(d.option("f", |d| d.u32("f")).unwrap(), Some(5));
        assert_eq!(d.option("g", |d| d.u32("g")).unwrap(), None);
        d.finish("all").unwrap();
    }

    #[test]
    fn short_and_oversized_inputs_are_errors() {
        let mut d = Decoder::new(&[1, 2, 3]);
        let err = d.u32("the count").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the count: needs 4 bytes at offset 0 but only 3 remain"
        );
        // A blob claiming 2^64-1 bytes must not allocate or panic.
        let mut d = Decoder::new(&[0xff; 8]);
        assert!(d.blob("blob").is_err());
        // A list longer than allowed, and one longer than the input.
        let mut e = Encoder::default();
        e.u32(3);
        let bytes = e.into_bytes();
        assert!(Decoder::new(&bytes)
            .pod_list::<kvm_msr_entry>(2, "msrs")
            .unwrap_err()
            .to_string()
            .contains("more than the 2 allowed"));
        assert!(Decoder::new(&bytes)
            .pod_list::<kvm_msr_entry>(8, "msrs")
            .unwrap_err()
            .to_string()
            .contains("do not fit"));
        assert!(Decoder::new(&[2])
            .option("opt", |d| d.u8("x"))
            .unwrap_err()
            .to_string()
            .contains("presence tag is 2"));
        assert!(Decoder::new(&[1]).finish("x").is_err());
    }
}
