//! Starting glommio executors: one per core, pinned, named. Shared by the
//! sender's shards and the sink.

use glommio::{CpuSet, ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use std::future::Future;

/// The CPUs this process may run on, in ascending order: online ones within
/// its affinity mask (`taskset`, a cgroup's cpuset), so executors are pinned
/// where the operator put the process, not onto CPUs it was kept off. Read
/// once, before any executor thread narrows its own mask.
pub fn cpus() -> Vec<usize> {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    CPUS.get_or_init(|| {
        let online: Vec<usize> = CpuSet::online()
            .map(|s| s.into_iter().map(|l| l.cpu).collect())
            .unwrap_or_default();
        within_affinity(online, allowed_cpus().as_deref())
    })
    .clone()
}

/// The process's affinity mask, if it can be read.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return None;
    }
    let bits = (size * 8).min(libc::CPU_SETSIZE as usize);
    // SAFETY: CPU_ISSET reads the set for an index under its size.
    Some((0..bits).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// `online` narrowed to `allowed` (all of `online` when the mask is unknown or
/// shares none of it), sorted, without repeats, never empty.
fn within_affinity(online: Vec<usize>, allowed: Option<&[usize]>) -> Vec<usize> {
    let mut cpus: Vec<usize> = match allowed {
        Some(a) if online.iter().any(|c| a.contains(c)) => online.into_iter().filter(|c| a.contains(c)).collect(),
        Some(a) if online.is_empty() => a.to_vec(),
        _ => online,
    };
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}

/// glommio refuses to start an executor under this locked-memory limit
/// (RLIMIT_MEMLOCK), whatever its io_memory.
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Makes sure executors can start: a locked-memory limit under
/// `MIN_MEMLOCK` is raised (the soft limit up to the hard one, which anyone
/// may; past it where the process may), or refused with what to do.
pub fn ensure_memlock() -> std::io::Result<()> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Ok(());
    }
    let enough = |v: libc::rlim_t| v == libc::RLIM_INFINITY || v >= MIN_MEMLOCK;
    if enough(r.rlim_cur) {
        return Ok(());
    }
    let set = |cur: libc::rlim_t, max: libc::rlim_t| {
        let r = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) == 0 }
    };
    if (enough(r.rlim_max) && set(MIN_MEMLOCK, r.rlim_max)) || set(MIN_MEMLOCK, MIN_MEMLOCK) {
        return Ok(());
    }
    let kib = |v: libc::rlim_t| v / 1024;
    Err(std::io::Error::other(format!(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {} KiB and may not be raised past {} KiB here; \
         volley's io_uring executors (glommio) need at least {} KiB. Raise it where volley is started: \
         `ulimit -l 1024` in its shell (as root, or under a hard limit that allows it), \
         LimitMEMLOCK=1M in its systemd unit, `--ulimit memlock=1048576` for podman or docker, \
         a memlock line in /etc/security/limits.conf, or the SYS_RESOURCE capability (volley then raises the limit itself)",
        kib(r.rlim_cur),
        kib(r.rlim_max),
        kib(MIN_MEMLOCK)
    )))
}

/// Starts executor `index` pinned to the `index`-th online CPU (wrapping).
pub fn spawn_pinned<G, F, T>(name: &str, index: usize, fut_gen: G) -> std::io::Result<ExecutorJoinHandle<T>>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    ensure_memlock()?;
    let cpus = cpus();
    LocalExecutorBuilder::new(Placement::Fixed(cpus[index % cpus.len()]))
        .name(&format!("{name}-{index}"))
        .io_memory(1 << 20)
        .spawn(fut_gen)
        .map_err(|e| std::io::Error::other(format!("cannot start executor {name}-{index}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executors_go_only_on_cpus_the_affinity_mask_allows() {
        assert_eq!(within_affinity(vec![0, 1, 2, 3], Some(&[1])), vec![1], "taskset -c 1");
        assert_eq!(within_affinity(vec![3, 0, 2, 1], Some(&[2, 3, 9])), vec![2, 3]);
        assert_eq!(
            within_affinity(vec![0, 1], None),
            vec![0, 1],
            "no mask: every online CPU"
        );
        assert_eq!(within_affinity(vec![], Some(&[5])), vec![5], "online unknown: the mask");
        assert_eq!(
            within_affinity(vec![0, 1], Some(&[7])),
            vec![0, 1],
            "a mask of none online"
        );
        assert_eq!(within_affinity(vec![], None), vec![0]);
    }
}
