//! SHA-256 for appliance cache keys and the init binary's content hash: the `sha2` crate's
//! digest, plus the length-prefixed [`Sha256::field`] the cache keys are built from and
//! [`hash_file`].

use sha2::Digest;

/// Streaming SHA-256 state.
#[derive(Clone, Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// Feeds a length-prefixed field, so concatenations of fields cannot collide.
    pub fn field(&mut self, data: &[u8]) {
        self.update(&(data.len() as u64).to_le_bytes());
        self.update(data);
    }

    /// Finishes and returns the 32-byte digest.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }

    /// Finishes and returns the digest as lowercase hex.
    pub fn finish_hex(self) -> String {
        self.finish().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hashes a whole file, streaming it.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(data: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(data);
        h.finish_hex()
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = Sha256::new();
        for chunk in data.chunks(13) {
            h.update(chunk);
        }
        assert_eq!(h.finish_hex(), hex(&data));
    }

    #[test]
    fn million_a() {
        let mut h = Sha256::new();
        let block = [b'a'; 1000];
        for _ in 0..1000 {
            h.update(&block);
        }
        assert_eq!(
            h.finish_hex(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn a_file_hashes_like_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut h = Sha256::new();
        h.update(&data);
        assert_eq!(hash_file(&path).unwrap(), h.finish());
        assert!(hash_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn length_prefixed_fields_give_the_recorded_cache_key() {
        // Recorded from the hand-written SHA-256 this module had before it used the sha2
        // crate: cache keys must not change when the implementation does.
        let mut h = Sha256::new();
        h.field(b"bootbox-appliance");
        h.field(&3u32.to_le_bytes());
        for t in ["busybox", "find", "sha256sum"] {
            h.field(t.as_bytes());
        }
        h.field(&[0xa5; 32]);
        h.update(&(0..300u32).map(|i| i as u8).collect::<Vec<_>>());
        assert_eq!(
            h.finish_hex(),
            "9201cccbf7868509b7aedf8ee899bbc6209746dde1cf8d76ad5c91228ec995bc"
        );
    }
}
