//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+, hash and LRU hash maps).
//!
//! aya 0.14 walks a map with two syscalls per entry (`GET_NEXT_KEY`, then `LOOKUP_ELEM`): at
//! 200,000 flows that was most of a tick's CPU (docs/BENCHMARKS.md, issue 15). A batch call
//! copies whole hash buckets, thousands of entries per syscall, and walks by bucket index, so
//! an entry deleted or evicted meanwhile neither restarts the walk (as a deleted
//! `GET_NEXT_KEY` cursor does) nor fails a lookup. aya has no batch operations in this
//! version, so this module makes the one syscall itself.
//!
//! [`lookup_all`] says [`BatchError::Unsupported`] where the kernel has no batch command or
//! not for this map type; the caller then walks the map the old way.

use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `enum bpf_cmd` in `include/uapi/linux/bpf.h`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `ENOTSUPP`, the kernel-internal errno a map type without batch operations returns.
const ENOTSUPP: i32 = 524;
/// Entries asked for per call: a few hundred KiB of buffer for the flow map's values, and
/// few enough syscalls (25 at 200,000 flows).
pub const CHUNK: u32 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// This kernel or map type has no `BPF_MAP_LOOKUP_BATCH`.
    #[error("BPF_MAP_LOOKUP_BATCH is not supported here: {0}")]
    Unsupported(std::io::Error),
    #[error("BPF_MAP_LOOKUP_BATCH failed: {0}")]
    Io(std::io::Error),
}

/// The `batch` member of `union bpf_attr` (UAPI, append-only).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Appends every entry of the hash map behind `fd` to `out`, `chunk` entries per syscall.
///
/// `K` and `V` must be the map's key and value types, of exactly its key and value sizes (aya's
/// typed map constructors check that; the caller builds one first), and not per-CPU values.
/// An entry added or removed during the walk may or may not be seen, as with any walk of a
/// live map; none is seen twice.
pub fn lookup_all<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    chunk: u32,
    out: &mut Vec<(K, V)>,
) -> Result<(), BatchError> {
    for_each_batch(fd, chunk, &mut |keys: &[K], values: &[V]| {
        out.extend(keys.iter().copied().zip(values.iter().copied()));
    })
}

/// Counts the entries of the hash map behind `fd` (as [`lookup_all`] reads them), holding
/// one chunk at a time.
pub fn count<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    chunk: u32,
) -> Result<usize, BatchError> {
    let mut n = 0;
    for_each_batch(fd, chunk, &mut |keys: &[K], _: &[V]| n += keys.len())?;
    Ok(n)
}

/// Hands each batch of entries (keys and values, index for index) to `each`.
fn for_each_batch<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    mut chunk: u32,
    each: &mut dyn FnMut(&[K], &[V]),
) -> Result<(), BatchError> {
    let map_fd = u32::try_from(fd.as_raw_fd())
        .map_err(|_| BatchError::Io(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // The cursor is the kernel's bucket index (a u32 for hash maps); u64 leaves room.
    let mut cursor: Option<u64> = None;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    let mut any = false;
    loop {
        let n = chunk as usize;
        keys.resize(n, K::default());
        values.resize(n, V::default());
        let mut next: u64 = 0;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: bpf(2) reads `attr` and writes back `count`; it writes at most `count` keys
        // and values (of the map's sizes, which are `K`'s and `V`'s, `Pod` so any bytes are
        // valid) into the two buffers, each `chunk` elements long, and the cursor into `next`.
        // All of them outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(std::io::Error::last_os_error);
        let errno = err.as_ref().and_then(std::io::Error::raw_os_error);
        // `count` is written back on success and at the end (ENOENT) only; other errors may
        // leave it as it was sent.
        if matches!(errno, None | Some(libc::ENOENT)) {
            let got = (attr.count as usize).min(n);
            any |= got > 0;
            each(&keys[..got], &values[..got]);
        }
        match errno {
            None => {}
            // The last buckets were read.
            Some(libc::ENOENT) => return Ok(()),
            // One bucket holds more entries than `chunk` (the kernel copies nothing then):
            // ask again from the same bucket with room for it.
            Some(libc::ENOSPC) if chunk < u32::MAX / 2 => {
                chunk *= 2;
                continue;
            }
            // An unknown command (before 5.6) or a map type without batch operations; only
            // before anything was read, so a fallback walk does not see entries twice.
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if cursor.is_none() && !any => {
                return Err(BatchError::Unsupported(err.unwrap_or_else(|| {
                    std::io::Error::from(std::io::ErrorKind::Unsupported)
                })));
            }
            Some(_) => {
                return Err(BatchError::Io(
                    err.unwrap_or_else(|| std::io::Error::other("bpf(2) failed")),
                ))
            }
        }
        cursor = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    /// A map made with bpf(2), or `None` where this process may not (not root).
    fn create(map_type: u32, key_size: u32, value_size: u32, max: u32) -> Option<OwnedFd> {
        let attr: [u32; 5] = [map_type, key_size, value_size, max, 0];
        // SAFETY: BPF_MAP_CREATE reads `size_of_val(&attr)` bytes of a live array.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: the kernel just returned this fd and nothing else holds it.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn update(fd: &OwnedFd, key: u64, value: &[u64; 3]) {
        // `map_fd`, pad, key, value, flags: the `BPF_MAP_*_ELEM` member of `bpf_attr`.
        let attr: [u64; 4] = [
            fd.as_raw_fd() as u64,
            std::ptr::from_ref(&key) as u64,
            value.as_ptr() as u64,
            0,
        ];
        // SAFETY: the kernel reads the attribute, the key and the value, all live.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert_eq!(ret, 0, "update: {}", std::io::Error::last_os_error());
    }

    #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
    #[repr(C)]
    struct Value([u64; 3]);
    // SAFETY: three u64, no padding, any bytes valid.
    unsafe impl aya::Pod for Value {}

    #[test]
    fn every_entry_of_an_lru_hash_map_is_read_once_across_many_small_batches() {
        let Some(fd) = create(BPF_MAP_TYPE_LRU_HASH, 8, 24, 4096) else {
            eprintln!("SKIPPED batch read: cannot create a BPF map here (not root?)");
            return;
        };
        for key in 1..=1000u64 {
            update(&fd, key, &[key, key * 2, key * 3]);
        }
        let mut out: Vec<(u64, Value)> = Vec::new();
        // A small chunk: many calls, and buckets that may not fit (ENOSPC, then a larger ask).
        lookup_all(fd.as_fd(), 1, &mut out).expect("batch read");
        out.sort_unstable_by_key(|e| e.0);
        assert_eq!(out.len(), 1000, "every entry once");
        for (key, v) in &out {
            assert_eq!(
                v.0,
                [*key, key * 2, key * 3],
                "the value stored under {key}"
            );
        }
        assert_eq!(out.first().map(|e| e.0), Some(1));
        assert_eq!(out.last().map(|e| e.0), Some(1000));
        assert_eq!(count::<u64, Value>(fd.as_fd(), 7).expect("count"), 1000);
    }

    #[test]
    fn a_map_type_without_hash_batches_is_reported_unsupported_with_nothing_read() {
        // A queue has no batch operations: the kernel answers as a pre-5.6 one would for any
        // map, and the caller walks instead.
        const BPF_MAP_TYPE_QUEUE: u32 = 22;
        let Some(fd) = create(BPF_MAP_TYPE_QUEUE, 0, 8, 16) else {
            eprintln!("SKIPPED batch fallback: cannot create a BPF map here (not root?)");
            return;
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let e = lookup_all(fd.as_fd(), CHUNK, &mut out).expect_err("queues have no batches");
        assert!(matches!(e, BatchError::Unsupported(_)), "{e}");
        assert!(out.is_empty());
    }
}
