//! The compute threads of the forward pass: a small fixed pool whose workers spin briefly between
//! parallel regions.
//!
//! A forward step is a chain of short parallel regions (four per layer, a few tens of microseconds each
//! when decoding one token). A general-purpose pool that puts its workers to sleep between regions pays a
//! wake-up in every one of them; here a worker spins for [`SPIN`] after its last task, so the next region
//! starts at once, and parks only when the engine goes idle. The thread that submits a region works on it
//! too. Results never depend on the pool: every task computes fixed outputs in a fixed order.

use std::cell::{RefCell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

type Job = *const (dyn Fn(usize) + Sync);

struct Inner {
    threads: usize,
    /// `epoch << 32 | closed << 31 | workers in the current region`
    state: AtomicU64,
    /// The region's task function; valid while its epoch is open or has workers joined.
    job: UnsafeCell<Option<Job>>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    pending: AtomicUsize,
    panicked: AtomicBool,
    /// One region at a time; a second submitter runs its region alone.
    submit: Mutex<()>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the holder of `submit` while no worker can read it (no open epoch
// and no joined worker), and read by workers only after joining an open epoch (Acquire on `state`).
unsafe impl Sync for Inner {}
unsafe impl Send for Inner {}

/// A fixed set of compute threads (the calling thread counts as one).
pub struct Pool {
    inner: Arc<Inner>,
    handles: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.inner.threads)
    }
}

impl Pool {
    /// A pool of `threads` compute threads (at least one): `threads - 1` workers plus the caller.
    pub fn new(threads: usize) -> Arc<Pool> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            threads,
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            submit: Mutex::new(()),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let handles = (1..threads)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new().name(format!("flotilla-compute-{i}")).spawn(move || worker(&inner)).expect("spawn a compute thread")
            })
            .collect();
        Arc::new(Pool { inner, handles })
    }

    /// Compute threads, the caller included.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Runs `f` with this pool as the current one on this thread.
    pub fn install<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        let prev = CURRENT.with(|c| c.replace(Some(self.clone())));
        struct Restore(Option<Arc<Pool>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| *c.borrow_mut() = self.0.take());
            }
        }
        let _restore = Restore(prev);
        f()
    }

    /// `f(0)`, ..., `f(tasks - 1)`, spread over the pool; returns when all have run.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let inner = &*self.inner;
        if inner.threads == 1 || tasks <= 1 {
            return (0..tasks).for_each(f);
        }
        let Ok(_guard) = inner.submit.try_lock() else {
            return (0..tasks).for_each(f);
        };
        // SAFETY: the lifetime is erased only until this function returns, and it returns only after the
        // epoch is closed and every worker that joined it has left.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f) };
        unsafe { *inner.job.get() = Some(job) };
        inner.tasks.store(tasks, Relaxed);
        inner.next.store(0, Relaxed);
        inner.pending.store(tasks, Relaxed);
        let epoch = (inner.state.load(Relaxed) >> 32).wrapping_add(1) & 0xFFFF_FFFF;
        inner.state.store(epoch << 32, SeqCst);
        if inner.sleepers.load(SeqCst) > 0 {
            let _l = inner.lock.lock().unwrap_or_else(|e| e.into_inner());
            inner.wake.notify_all();
        }
        // the submitter runs tasks too: a region started inside one of them runs there alone, as on a worker
        let outer = IN_TASK.with(|w| w.replace(true));
        let mine = catch_unwind(AssertUnwindSafe(|| run_tasks(inner, f)));
        IN_TASK.with(|w| w.set(outer));
        while inner.pending.load(Acquire) != 0 {
            std::hint::spin_loop();
        }
        inner.state.fetch_or(CLOSED, AcqRel);
        while inner.state.load(Acquire) & JOINED != 0 {
            std::hint::spin_loop();
        }
        unsafe { *inner.job.get() = None };
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if inner.panicked.swap(false, Relaxed) {
            panic!("a compute task panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, SeqCst);
        {
            let _l = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Claims and runs tasks until none are left.
fn run_tasks(inner: &Inner, f: &(dyn Fn(usize) + Sync)) {
    let tasks = inner.tasks.load(Relaxed);
    loop {
        let i = inner.next.fetch_add(1, Relaxed);
        if i >= tasks {
            return;
        }
        let r = catch_unwind(AssertUnwindSafe(|| f(i)));
        if r.is_err() {
            inner.panicked.store(true, Relaxed);
        }
        inner.pending.fetch_sub(1, Release);
    }
}

fn worker(inner: &Inner) {
    IN_TASK.with(|w| w.set(true));
    let mut seen = 0u64;
    loop {
        // wait for a new epoch: spin, then park
        let started = Instant::now();
        let mut spins = 0u32;
        let s = loop {
            let s = inner.state.load(Acquire);
            if s >> 32 != seen || inner.shutdown.load(Relaxed) {
                break s;
            }
            spins += 1;
            if spins.is_multiple_of(256) && started.elapsed() > SPIN {
                let mut l = inner.lock.lock().unwrap_or_else(|e| e.into_inner());
                inner.sleepers.fetch_add(1, SeqCst);
                while inner.state.load(SeqCst) >> 32 == seen && !inner.shutdown.load(SeqCst) {
                    l = inner.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                inner.sleepers.fetch_sub(1, SeqCst);
                drop(l);
                spins = 0;
                continue;
            }
            std::hint::spin_loop();
        };
        if inner.shutdown.load(Relaxed) {
            return;
        }
        seen = s >> 32;
        // join the region unless it is already closed
        let mut cur = s;
        let joined = loop {
            if cur >> 32 != seen || cur & CLOSED != 0 {
                break false;
            }
            match inner.state.compare_exchange_weak(cur, cur + 1, AcqRel, Acquire) {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if joined {
            // SAFETY: joined an open epoch, so the submitter keeps the job alive until this worker leaves.
            if let Some(job) = unsafe { *inner.job.get() } {
                run_tasks(inner, unsafe { &*job });
            }
            inner.state.fetch_sub(1, Release);
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Pool>>> = const { RefCell::new(None) };
    /// Set on pool workers, and on a submitter while it runs tasks: a region started inside a task runs on
    /// that thread alone.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static GLOBAL: OnceLock<Arc<Pool>> = OnceLock::new();

/// Sets the pool of threads that have none installed (once per process; later calls keep the first).
pub fn set_global(threads: usize) -> Arc<Pool> {
    GLOBAL.get_or_init(|| Pool::new(threads)).clone()
}

/// The pool regions on this thread run on: the installed one, else the global one (all CPUs by default).
pub fn current() -> Arc<Pool> {
    CURRENT
        .with(|c| c.borrow().clone())
        .unwrap_or_else(|| GLOBAL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get()))).clone())
}

/// Compute threads of the current pool (1 inside a task).
pub fn current_threads() -> usize {
    if IN_TASK.with(|w| w.get()) {
        return 1;
    }
    CURRENT.with(|c| c.borrow().as_ref().map(|p| p.threads())).unwrap_or_else(|| current().threads())
}

/// Range `t` of `0..n` cut into `parts` consecutive ranges whose sizes differ by at most one, the larger
/// first.
pub fn range(n: usize, parts: usize, t: usize) -> std::ops::Range<usize> {
    let (per, extra) = (n / parts, n % parts);
    let start = |t: usize| t * per + t.min(extra);
    start(t)..start(t + 1)
}

/// `f(i)` for every `i < tasks` on the current pool.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    if IN_TASK.with(|w| w.get()) {
        return (0..tasks).for_each(f);
    }
    current().for_each(tasks, &f)
}

/// `f(i)` for every `i < tasks` on the current pool, in order.
pub fn map<T: Send>(tasks: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..tasks).map(|_| Mutex::new(None)).collect();
    for_each(tasks, |i| *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(f(i)));
    slots.into_iter().map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every task ran")).collect()
}

/// `f(rows, part)` over the `width`-wide rows of `x`, in parallel parts of whole rows when `x` holds at
/// least `min_len` values and the pool has several threads (else one call for every row). For row-wise
/// work: each row's result is the same whichever part it falls in.
pub fn rows_mut(x: &mut [f32], width: usize, min_len: usize, f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) {
    let rows = x.len().checked_div(width).unwrap_or(0);
    let threads = current_threads();
    if x.len() < min_len || threads == 1 || rows < 2 {
        return f(0..rows, x);
    }
    let per = rows.div_ceil(2 * threads);
    let parts: Vec<Mutex<&mut [f32]>> = x.chunks_mut(per * width).map(Mutex::new).collect();
    for_each(parts.len(), |i| {
        let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        let n = part.len() / width;
        f(i * per..i * per + n, &mut part)
    });
}

/// `f(i, &mut items[i])` for every item, in parallel tasks of whole items when the pool has several
/// threads and there are two or more (else in order on this thread).
pub fn each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    if items.len() < 2 || current_threads() == 1 {
        return items.iter_mut().enumerate().for_each(|(i, x)| f(i, x));
    }
    let slots: Vec<Mutex<&mut T>> = items.iter_mut().map(Mutex::new).collect();
    for_each(slots.len(), |i| f(i, &mut slots[i].lock().unwrap_or_else(|e| e.into_inner())));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mut_hands_every_item_its_index_once() {
        for threads in [1, 2, 3] {
            Pool::new(threads).install(|| {
                for n in [0usize, 1, 2, 5, 64] {
                    let mut items: Vec<(usize, usize)> = vec![(usize::MAX, 0); n];
                    each_mut(&mut items, |i, x| *x = (i, x.1 + 1));
                    assert!(items.iter().enumerate().all(|(i, &(seen, visits))| seen == i && visits == 1), "{threads} threads, {n} items");
                }
            });
        }
    }

    #[test]
    fn every_task_runs_once_across_many_regions() {
        let pool = Pool::new(3);
        pool.install(|| {
            for round in 0..2000 {
                let n = 1 + round % 37;
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
            }
            assert_eq!(map(10, |i| i * i), (0..10).map(|i| i * i).collect::<Vec<_>>());
            // every row exactly once, whatever the split
            for rows in [1usize, 2, 5, 64, 999] {
                let mut x = vec![0f32; rows * 3];
                rows_mut(&mut x, 3, 0, |r, part| {
                    assert_eq!(part.len(), r.len() * 3);
                    for (i, row) in r.zip(part.chunks_exact_mut(3)) {
                        row.iter_mut().for_each(|v| *v += i as f32);
                    }
                });
                assert!(x.chunks_exact(3).enumerate().all(|(i, row)| row.iter().all(|&v| v == i as f32)), "{rows} rows");
            }
        });
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 5);
        let sum = AtomicUsize::new(0);
        pool.for_each(100, &|i| {
            sum.fetch_add(i, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 4950);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.for_each(8, &|i| assert_ne!(i, 5))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.for_each(8, &|_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 8);
    }

    #[test]
    fn concurrent_submitters_each_get_all_their_tasks() {
        let pool = Pool::new(2);
        std::thread::scope(|s| {
            for _ in 0..3 {
                let pool = pool.clone();
                s.spawn(move || {
                    for _ in 0..500 {
                        let n = AtomicUsize::new(0);
                        pool.for_each(16, &|_| {
                            n.fetch_add(1, Relaxed);
                        });
                        assert_eq!(n.load(Relaxed), 16);
                    }
                });
            }
        });
    }
}
