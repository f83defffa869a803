//! Large bodies for the streaming tests: content that catches a misordered, repeated or lost
//! chunk ([`Pattern`]), written to a file in a few seconds per GiB ([`write_pattern_file`]),
//! SHA-256 over it as it goes ([`Sha256`]), and `curl` as a real outside caller
//! ([`curl_download`]).
//!
//! The content is a 1 MiB pseudo-random block repeated, each 4 KiB page of each copy stamped
//! with its own offset in the whole: no two 64 KiB chunks are alike, so a body whose chunks
//! came in the wrong order, twice or not at all has another SHA-256.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bytes::Bytes;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// The size of a stamped page of a [`Pattern`].
const PAGE: usize = 4096;

/// SHA-256, fed piece by piece, as lower-case hex at the end.
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    /// A fresh digest.
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Feed `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything fed, as hex.
    pub fn hex(self) -> String {
        hex(self.0.finish().as_ref())
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// The SHA-256 of `bytes`, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut sha = Sha256::new();
    sha.update(bytes);
    sha.hex()
}

/// The SHA-256 of the file at `path`, as hex, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(sha.hex());
        }
        sha.update(&buf[..n]);
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// A body of `mib` MiB of deterministic content, yielded 1 MiB at a time (an [`Iterator`] of
/// [`Bytes`]): one pseudo-random block of 1 MiB from `seed`, each 4 KiB page of each copy
/// stamped with its offset in the body (8 bytes, little-endian).
#[derive(Clone)]
pub struct Pattern {
    block: Vec<u8>,
    next: u64,
    blocks: u64,
}

impl Pattern {
    /// `mib` MiB of content from `seed`.
    pub fn new(seed: u64, mib: u64) -> Pattern {
        // xorshift64*: deterministic, and no dependency on a generator's version.
        let mut state = seed | 1;
        let mut block = Vec::with_capacity(MIB as usize);
        while block.len() < MIB as usize {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            block.extend_from_slice(&word.to_le_bytes());
        }
        Pattern {
            block,
            next: 0,
            blocks: mib,
        }
    }

    /// The length of the whole body, in bytes.
    pub fn len(&self) -> u64 {
        self.blocks * MIB
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// The blocks not yet yielded.
    pub fn remaining(&self) -> u64 {
        self.blocks - self.next
    }

    /// Block `i` (the bytes from `i` MiB on), stamped.
    pub fn block(&self, i: u64) -> Vec<u8> {
        let mut block = self.block.clone();
        for (p, page) in block.chunks_mut(PAGE).enumerate() {
            let offset = i * MIB + (p * PAGE) as u64;
            page[..8].copy_from_slice(&offset.to_le_bytes());
        }
        block
    }
}

impl Iterator for Pattern {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.next >= self.blocks {
            return None;
        }
        let block = self.block(self.next);
        self.next += 1;
        Some(Bytes::from(block))
    }
}

/// A file written from a [`Pattern`].
#[derive(Clone, Debug)]
pub struct PatternFile {
    /// Where it is, canonical (as `/proc/<pid>/fd` shows it).
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: u64,
    /// Its SHA-256, as hex.
    pub sha256: String,
}

/// Write `mib` MiB of [`Pattern`] content from `seed` to `path`, hashing it on the way.
pub fn write_pattern_file(path: &Path, mib: u64, seed: u64) -> PatternFile {
    let mut file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut sha = Sha256::new();
    let pattern = Pattern::new(seed, mib);
    let len = pattern.len();
    for block in pattern {
        sha.update(&block);
        file.write_all(&block)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    file.flush().expect("flush the pattern file");
    drop(file);
    PatternFile {
        path: std::fs::canonicalize(path).expect("canonical path"),
        len,
        sha256: sha.hex(),
    }
}

/// `curl -sS -o <out> <extra...> <url>`, started (not awaited), killed if dropped. Its exit
/// code says how the transfer ended: 0 whole, 18 partial file, 56 failure receiving data.
pub fn curl_download(url: &str, out: &Path, extra: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-o"])
        .arg(out)
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run curl (installed by .ci/run)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn no_two_chunks_of_a_pattern_are_alike() {
        let pattern = Pattern::new(7, 2);
        let body: Vec<u8> = pattern.clone().flat_map(|b| b.to_vec()).collect();
        assert_eq!(body.len() as u64, pattern.len());
        let chunks: Vec<&[u8]> = body.chunks(64 * 1024).collect();
        for (i, a) in chunks.iter().enumerate() {
            for b in &chunks[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn a_pattern_file_holds_the_pattern() {
        let dir = tempfile::tempdir().unwrap();
        let file = write_pattern_file(&dir.path().join("p.bin"), 3, 11);
        assert_eq!(std::fs::metadata(&file.path).unwrap().len(), 3 * MIB);
        assert_eq!(sha256_file(&file.path).unwrap(), file.sha256);
        let whole: Vec<u8> = Pattern::new(11, 3).flat_map(|b| b.to_vec()).collect();
        assert_eq!(sha256_hex(&whole), file.sha256);
    }
}
