//! Decompression of one compressed qcow2 cluster, by the image's compression type: QEMU's
//! "zlib" (a raw deflate stream) or zstd (one or more zstd frames, as QEMU reads them).
//!
//! QEMU's rules hold for both: the data must decompress to exactly one cluster, and bytes after
//! the end of the compressed data (the descriptor counts whole 512-byte sectors) are padding.
//! Anything else (invalid data, too little or too much output) is a one-line reason, never a
//! panic, and memory stays bounded: the output is the cluster, and a zstd frame may not ask for
//! a window above [`MAX_ZSTD_WINDOW`].

use super::header::Compression;
use std::io::Read;

/// Largest zstd window a frame may declare. QEMU's own frames declare at most the cluster size
/// (2 MiB at most); the decoder reserves the declared window, so this bounds its memory.
pub const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Longest reason kept from a decoder's error message.
const MAX_REASON: usize = 200;

/// Decompresses `input` (a compressed cluster and its padding) into exactly `output.len()`
/// bytes, or says why it cannot.
pub fn decompress_cluster(
    compression: Compression,
    input: &[u8],
    output: &mut [u8],
) -> Result<(), String> {
    match compression {
        Compression::Zlib => inflate_cluster(input, output),
        Compression::Zstd => unzstd_cluster(input, output),
    }
}

/// Inflates the raw deflate stream in `input` into exactly `output.len()` bytes.
fn inflate_cluster(input: &[u8], output: &mut [u8]) -> Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut state = DecompressorOxide::new();
    let (status, _read, written) = decompress(
        &mut state,
        input,
        output,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == output.len() => Ok(()),
        TINFLStatus::Done | TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput => {
            Err(format!(
                "inflates to {written} bytes, not the {}-byte cluster",
                output.len()
            ))
        }
        other => Err(format!("invalid deflate data ({other:?})")),
    }
}

/// Decodes the zstd frames at the start of `input` into exactly `output.len()` bytes.
///
/// Like QEMU (which calls `ZSTD_decompressStream` until the cluster is full), frames are
/// decoded one after another, skippable frames skipped, until the cluster is full; the frame
/// that fills it must end there, and whatever follows it is padding. Checksums are verified
/// when a frame carries one.
fn unzstd_cluster(input: &[u8], output: &mut [u8]) -> Result<(), String> {
    // The decoder is a third-party parser of hostile bytes: should it ever panic, that is an
    // error for this read, not the end of the process. Nothing outlives a failed call.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        unzstd_frames(input, output)
    }))
    .unwrap_or_else(|_| Err("the zstd decoder failed on this data".into()))
}

fn unzstd_frames(mut input: &[u8], output: &mut [u8]) -> Result<(), String> {
    use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

    let cluster = output.len();
    let short = |written: usize| {
        format!("zstd data decodes to {written} bytes, not the {cluster}-byte cluster")
    };
    let invalid = |e: &dyn std::fmt::Display| format!("invalid zstd data: {}", one_line(e));
    let mut decoder = FrameDecoder::new();
    decoder.set_max_window_size(MAX_ZSTD_WINDOW);
    let mut written = 0;
    let mut frames = 0;
    while written < cluster {
        if input.is_empty() {
            return Err(short(written));
        }
        match decoder.reset(&mut input) {
            Ok(()) => {}
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                input = input
                    .get(length as usize..)
                    .ok_or("a skippable zstd frame runs past the compressed data")?;
                continue;
            }
            // After a whole frame, what follows is padding, not another frame: the data
            // was too short.
            Err(FrameDecoderError::ReadFrameHeaderError(
                ReadFrameHeaderError::BadMagicNumber(_)
                | ReadFrameHeaderError::MagicNumberReadError(_),
            )) if frames > 0 => return Err(short(written)),
            Err(e) => return Err(invalid(&e)),
        }
        frames += 1;
        loop {
            // One block (at most 128 KiB) at a time; the decoder keeps at most its window
            // back, so it never holds more than the window and a block.
            let finished = decoder
                .decode_blocks(&mut input, BlockDecodingStrategy::UptoBlocks(1))
                .map_err(|e| invalid(&e))?;
            written += decoder
                .read(&mut output[written..])
                .map_err(|e| invalid(&e))?;
            if decoder.can_collect() > 0 {
                return Err(format!(
                    "zstd data decodes to more than the {cluster}-byte cluster"
                ));
            }
            if finished {
                break;
            }
        }
        if let (Some(stored), Some(computed)) = (
            decoder.get_checksum_from_data(),
            decoder.get_calculated_checksum(),
        ) {
            if stored != computed {
                return Err(format!(
                    "zstd checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                ));
            }
        }
    }
    Ok(())
}

/// A decoder's error message on one line of bounded length.
fn one_line(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruzstd::encoding::{compress_to_vec, CompressionLevel};

    fn cluster_data(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i * 7 % 251) as u8 ^ (i / 300) as u8)
            .collect()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        compress_to_vec(data, CompressionLevel::Fastest)
    }

    #[test]
    fn inflate_requires_a_full_cluster() {
        let data = cluster_data(4096);
        let mut packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        packed.extend_from_slice(&[0xaa; 300]); // sector padding after the stream
        let mut out = vec![0u8; 4096];
        decompress_cluster(Compression::Zlib, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        let mut bigger = vec![0u8; 8192];
        assert!(decompress_cluster(Compression::Zlib, &packed, &mut bigger).is_err());
        assert!(decompress_cluster(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn zstd_fills_the_cluster_and_ignores_padding() {
        let data = cluster_data(65536);
        let mut packed = zstd(&data);
        assert!(packed.len() < data.len());
        packed.extend_from_slice(&[0xaa; 511]);
        let mut out = vec![0u8; 65536];
        decompress_cluster(Compression::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        // Zero padding too (what QEMU leaves), and none at all.
        let mut exact = zstd(&data);
        let mut out = vec![0u8; 65536];
        decompress_cluster(Compression::Zstd, &exact, &mut out).unwrap();
        assert_eq!(out, data);
        exact.extend_from_slice(&[0; 100]);
        decompress_cluster(Compression::Zstd, &exact, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_output_must_be_exactly_one_cluster() {
        let data = cluster_data(8192);
        let packed = zstd(&data);
        let mut smaller = vec![0u8; 4096];
        let err = decompress_cluster(Compression::Zstd, &packed, &mut smaller).unwrap_err();
        assert!(err.contains("more than the 4096-byte cluster"), "{err}");
        let mut bigger = vec![0u8; 16384];
        let err = decompress_cluster(Compression::Zstd, &packed, &mut bigger).unwrap_err();
        assert!(err.contains("decodes to 8192 bytes"), "{err}");
        // Padding after a short frame is not read as another frame.
        let mut padded = packed.clone();
        padded.extend_from_slice(&[0; 512]);
        let err = decompress_cluster(Compression::Zstd, &padded, &mut bigger).unwrap_err();
        assert!(err.contains("decodes to 8192 bytes"), "{err}");
    }

    #[test]
    fn zstd_frames_and_skippable_frames_in_sequence_fill_one_cluster() {
        let data = cluster_data(8192);
        let mut packed = zstd(&data[..3000]);
        // A skippable frame: magic 0x184d2a5?, little-endian length, that many bytes.
        packed.extend_from_slice(&0x184d_2a53u32.to_le_bytes());
        packed.extend_from_slice(&5u32.to_le_bytes());
        packed.extend_from_slice(b"hello");
        packed.extend_from_slice(&zstd(&data[3000..]));
        let mut out = vec![0u8; 8192];
        decompress_cluster(Compression::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, data);
        // A skippable frame whose length runs past the data.
        let mut lying = 0x184d_2a50u32.to_le_bytes().to_vec();
        lying.extend_from_slice(&1000u32.to_le_bytes());
        assert!(decompress_cluster(Compression::Zstd, &lying, &mut out).is_err());
    }

    #[test]
    fn damaged_zstd_data_is_an_error() {
        let data = cluster_data(8192);
        let packed = zstd(&data);
        let mut out = vec![0u8; 8192];
        assert!(decompress_cluster(Compression::Zstd, &[], &mut out).is_err());
        assert!(decompress_cluster(Compression::Zstd, &[0xff; 512], &mut out).is_err());
        // Truncated anywhere.
        for cut in [1, 4, 6, 10, packed.len() / 2, packed.len() - 1] {
            let err = decompress_cluster(Compression::Zstd, &packed[..cut], &mut out).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
        }
        // Every single-byte change either fails or (in literals) yields other bytes: it never
        // panics and never writes outside the cluster.
        for at in 0..packed.len() {
            let mut bad = packed.clone();
            bad[at] ^= 0x5a;
            if let Err(err) = decompress_cluster(Compression::Zstd, &bad, &mut out) {
                assert!(!err.contains('\n') && err.len() < 300, "{err}");
            }
        }
    }

    #[test]
    fn zstd_checksum_is_verified_when_present() {
        // The encoder ends its frames with a content checksum (QEMU's frames have none).
        let data = cluster_data(4096);
        let mut packed = zstd(&data);
        let mut out = vec![0u8; 4096];
        decompress_cluster(Compression::Zstd, &packed, &mut out).unwrap();
        let n = packed.len();
        packed[n - 1] ^= 0x80;
        let err = decompress_cluster(Compression::Zstd, &packed, &mut out).unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused() {
        // Window descriptor 0xff: exponent 31 -> a window of several GiB.
        let mut frame = 0xfd2f_b528u32.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0x00, 0xff, 0x01, 0x00, 0x00]);
        let mut out = vec![0u8; 512];
        let err = decompress_cluster(Compression::Zstd, &frame, &mut out).unwrap_err();
        assert!(err.contains("invalid zstd data"), "{err}");
    }
}
