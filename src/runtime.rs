//! Starting glommio executors: one per core, pinned, named. Shared by the
//! sender's shards and the sink.

use glommio::{CpuSet, ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use std::future::Future;

/// Online CPUs in ascending order.
pub fn cpus() -> Vec<usize> {
    let mut cpus: Vec<usize> = CpuSet::online()
        .map(|s| s.into_iter().map(|l| l.cpu).collect())
        .unwrap_or_default();
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}

/// Starts executor `index` pinned to the `index`-th online CPU (wrapping).
pub fn spawn_pinned<G, F, T>(name: &str, index: usize, fut_gen: G) -> std::io::Result<ExecutorJoinHandle<T>>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let cpus = cpus();
    LocalExecutorBuilder::new(Placement::Fixed(cpus[index % cpus.len()]))
        .name(&format!("{name}-{index}"))
        .io_memory(1 << 20)
        .spawn(fut_gen)
        .map_err(|e| std::io::Error::other(format!("cannot start executor {name}-{index}: {e}")))
}
