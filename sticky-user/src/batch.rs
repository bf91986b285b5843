//! Whole-map passes over a kernel hash map in batches: `BPF_MAP_LOOKUP_BATCH`
//! and `BPF_MAP_DELETE_BATCH` (Linux 5.6+), one syscall per `BATCH` entries
//! where aya 0.14's iterator makes two per entry (next key, lookup). The
//! expiry scan reads the whole `sessions` map every few seconds: with
//! 1,000,000 sessions that is the difference between a few ms and a
//! quarter of a CPU.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::{maps::MapData, Pod};

/// Entries asked for per lookup syscall.
const BATCH: usize = 4096;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
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

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix for the batch commands, and
    // the buffers it points to are sized for `count` entries.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Calls `each` with every (key, value) of the hash map, one batch at a
/// time. Entries added or removed meanwhile may or may not be seen (the
/// kernel walks bucket by bucket); none is seen twice.
pub fn for_each<K: Pod, V: Pod>(map: &MapData, mut each: impl FnMut(K, V)) -> io::Result<()> {
    let mut room = BATCH;
    let mut keys = vec![0u8; room * size_of::<K>()];
    let mut values = vec![0u8; room * size_of::<V>()];
    // The hash map's batch token is a bucket index (u32); room for more.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: room as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than fit: a bigger buffer.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                room *= 2;
                keys.resize(room * size_of::<K>(), 0);
                values.resize(room * size_of::<V>(), 0);
                continue;
            }
            Err(e) => return Err(e),
        };
        for i in 0..attr.count as usize {
            // SAFETY: the kernel wrote `count` keys and values; Pod types
            // are valid for any bytes; read_unaligned needs no alignment.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * size_of::<V>()).cast::<V>()),
                )
            };
            each(k, v);
        }
        if done {
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

/// Deletes `keys` from the map, a batch per syscall. A key already gone
/// is skipped (the kernel stops at it: the rest is retried after it).
/// Returns how many were deleted.
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(BATCH);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = attr.count as usize;
        deleted += done;
        match result {
            Ok(()) => rest = &rest[n..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && done < n => {
                rest = &rest[done + 1..]
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::{
        maps::{HashMap, IterableMap},
        Ebpf,
    };
    use sticky_common::Session;

    /// On the real `sessions` map of the steering object (needs root):
    /// several batches, keys seen once each, missing keys skipped.
    #[test]
    fn whole_map_passes_see_each_entry_once_and_skip_missing_keys() {
        let mut ebpf = Ebpf::load(sticky_ebpf::steer_object()).expect("loading (are you root?)");
        let mut map: HashMap<MapData, u64, Session> = ebpf
            .take_map(sticky_ebpf::maps::SESSIONS)
            .unwrap()
            .try_into()
            .unwrap();
        let n = 3 * BATCH as u64 + 17;
        for k in 0..n {
            map.insert(k * 7919, Session::registered((k % 5) as u32), 0)
                .unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        let mut per_worker = [0u64; 5];
        for_each(map.map(), |k: u64, s: Session| {
            assert!(seen.insert(k), "key {k} seen twice");
            assert_eq!(s.worker as u64, (k / 7919) % 5);
            per_worker[s.worker as usize] += 1;
        })
        .unwrap();
        println!(
            "{} entries in one pass, per worker {per_worker:?}",
            seen.len()
        );
        assert_eq!(seen.len() as u64, n);
        // Every other key, with missing ones in between and at the end.
        let mut doomed: Vec<u64> = (0..n).step_by(2).map(|k| k * 7919).collect();
        doomed.insert(10, 1);
        doomed.push(3);
        let deleted = delete(map.map(), &doomed).unwrap();
        assert_eq!(deleted as u64, n.div_ceil(2));
        let mut left = 0u64;
        for_each(map.map(), |k: u64, _: Session| {
            assert_eq!((k / 7919) % 2, 1, "key {k} should be gone");
            left += 1;
        })
        .unwrap();
        assert_eq!(left, n / 2);
    }
}
