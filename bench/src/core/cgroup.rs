//! A cgroup of sticky's own for a benchmark: sticky's cgroup programs run
//! on every packet of the processes in its cgroup, so with the clients in
//! it they would also run on the clients' packets, a cost a server whose
//! clients are elsewhere (or a systemd unit, `deploy/sticky.service`) does
//! not pay.

use std::path::PathBuf;

/// A cgroup v2 directory below this process's own, for sticky; removed on
/// drop (once sticky and its workers are gone).
pub(crate) struct BenchCgroup(pub PathBuf);

impl BenchCgroup {
    pub(crate) fn create(name: &str) -> Result<BenchCgroup, String> {
        let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
        let root = mounts
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .ok_or("no cgroup2 file system is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("this process is in no cgroup v2 hierarchy")?;
        let dir = root
            .join(own.trim_start_matches('/'))
            .join(format!("sticky-bench-{}-{name}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(BenchCgroup(dir))
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Exited processes leave the cgroup a moment after their parent
        // reaped them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("note: could not remove {}", self.0.display());
    }
}
