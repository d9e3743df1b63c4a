//! Data parallelism across processes: with the `mpi` cargo feature and a launch by `mpirun -np N
//! qdora train ...`, this process is rank `r` of `N`; without either, rank 0 of 1 and every
//! function here is free.
//!
//! Training needs three collective operations, all here: a sum of gradient (or loss) buffers
//! that comes out bit-identical on every rank and independent of timing (ranks' buffers are
//! gathered on rank 0, added in rank order, and broadcast back: `((g0 + g1) + g2) ...`, the
//! order a single process accumulates its micro-batches in), and an abort that stops every rank
//! when one fails. The buffers are cut into chunks so rank 0 never holds more than
//! `N × CHUNK` extra values, whatever the model size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// (rank, size) once MPI is initialized.
static WORLD: OnceLock<(usize, usize)> = OnceLock::new();

/// Values per collective call (16 MiB of f32 per rank).
const CHUNK: usize = 1 << 22;

/// Nanoseconds spent in [`sum_f32`] / [`sum_f64`] (waiting for other ranks included).
static SUM_NANOS: AtomicU64 = AtomicU64::new(0);

/// Seconds this process has spent in cross-rank sums so far (0 for one process): the
/// all-reduce's share of a run, with the time waiting for slower ranks.
pub fn sum_seconds() -> f64 {
    SUM_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
}

fn timed(f: impl FnOnce()) {
    let t = Instant::now();
    f();
    SUM_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Keeps MPI initialized while alive; MPI is finalized when it drops (at the end of `main`).
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Initializes MPI when this binary was built with the `mpi` feature and launched by an MPI
/// launcher (Open MPI, MPICH / PMI); otherwise does nothing.
pub fn init() -> Session {
    #[cfg(feature = "mpi")]
    {
        let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if launched {
            if let Some(u) = mpi::initialize() {
                use mpi::traits::Communicator;
                let w = u.world();
                let _ = WORLD.set((w.rank() as usize, w.size() as usize));
                return Session { _universe: Some(u) };
            }
        }
        Session { _universe: None }
    }
    #[cfg(not(feature = "mpi"))]
    Session {}
}

/// This process's rank (0 without MPI).
pub fn rank() -> usize {
    WORLD.get().map_or(0, |w| w.0)
}

/// The number of ranks (1 without MPI).
pub fn size() -> usize {
    WORLD.get().map_or(1, |w| w.1)
}

/// Whether this process writes the run's files and draws its progress (rank 0).
pub fn is_root() -> bool {
    rank() == 0
}

/// Replaces `buf` on every rank by the sum over ranks, added in rank order.
pub fn sum_f32(buf: &mut [f32]) {
    if size() > 1 {
        timed(|| buf.chunks_mut(CHUNK).for_each(imp::sum));
    }
}

/// [`sum_f32`] for f64 (losses and token counts).
pub fn sum_f64(buf: &mut [f64]) {
    if size() > 1 {
        timed(|| buf.chunks_mut(CHUNK).for_each(imp::sum));
    }
}

/// Whether `flag` is set on any rank (every rank gets the same answer).
pub fn any(flag: bool) -> bool {
    let mut v = [f64::from(u8::from(flag))];
    sum_f64(&mut v);
    v[0] > 0.0
}

/// Stops every rank with exit code `code` (the process alone without MPI).
pub fn abort(code: i32) -> ! {
    if size() > 1 {
        imp::abort(code)
    }
    std::process::exit(code)
}

#[cfg(feature = "mpi")]
mod imp {
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator, Equivalence, Root};

    pub fn sum<T: Equivalence + Copy + Default + std::ops::AddAssign>(buf: &mut [T]) {
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        if world.rank() == 0 {
            let n = buf.len();
            let mut all = vec![T::default(); n * world.size() as usize];
            root.gather_into_root(&*buf, &mut all[..]);
            for part in all.chunks(n).skip(1) {
                for (b, p) in buf.iter_mut().zip(part) {
                    *b += *p;
                }
            }
        } else {
            root.gather_into(&*buf);
        }
        root.broadcast_into(buf);
    }

    pub fn abort(code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}

#[cfg(not(feature = "mpi"))]
mod imp {
    pub fn sum<T>(_: &mut [T]) {
        unreachable!("size() is 1 without the mpi feature")
    }

    pub fn abort(code: i32) -> ! {
        std::process::exit(code)
    }
}
