//! The compute threads of the forward pass: a small fixed pool whose workers spin briefly between
//! parallel regions.
//!
//! A forward step is a chain of short parallel regions (four per layer, a few tens of microseconds each
//! when decoding one token). A general-purpose pool that puts its workers to sleep between regions pays a
//! wake-up in every one of them; here a worker spins for [`SPIN`] after its last task, so the next region
//! starts at once, and parks only when the engine goes idle. The thread that submits a region works on it
//! too. Results never depend on the pool: every task computes fixed outputs in a fixed order.
//!
//! The threads of a shared machine do not always run at the same speed: on the 2-vCPU VMs one vCPU was at
//! times 1.5-1.9x slower than the other for seconds on end, whichever thread ran on it (BENCHMARKS.md).
//! Work split evenly between threads then waits for the slower one. So the pool learns each thread's
//! share of the speed from the regions of one part per thread ([`Pool::for_each_part`]: part `i` runs on
//! thread `i`, and each part's size over the time it took is that thread's speed), and [`shares`] hands
//! those shares to the callers that cut their work ([`cut`]). Which rows or columns a thread computes
//! never changes what they are.
//!
//! A region costs the cache lines that move between cores: the submitter opens an epoch in `state`, a
//! worker joins it by setting its bit there, runs its part (or claims tasks), and sets its bit in `done`;
//! the submitter, done with its own part, closes the epoch and runs the parts of the workers that had not
//! joined. About 0.6 us for an empty region of two parts on the 2-vCPU VMs, against 1.4-1.6 us with a
//! claim flag and a pending count per region.

use std::cell::{RefCell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// Weight of one region's measurement in a thread's learnt share of the speed.
const LEARN: f64 = 0.125;

/// Compute threads a pool has at most (the submitter and 47 workers): one bit per worker in `state`.
pub const MAX_THREADS: usize = 48;
const EPOCH_SHIFT: u32 = 48;
const CLOSED: u64 = 1 << 47;
const JOINED: u64 = CLOSED - 1;

type Job = *const (dyn Fn(usize) + Sync);

/// One parallel region as a trace saw it ([`Pool::trace_start`]); times in nanoseconds on the trace's
/// clock ([`Pool::trace_ns`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionTrace {
    /// Its tasks, or its parts (one per thread).
    pub tasks: usize,
    pub parts: bool,
    /// The parts' summed sizes (tiles, rows, sequences: the caller's unit), or the task count.
    pub units: usize,
    /// When the submitter opened it, finished its own part (or its share of the tasks), finished the
    /// parts of the workers that had not joined (if any), and left it with every part run.
    pub open: u64,
    pub own_done: u64,
    pub others_done: u64,
    pub end: u64,
    /// Each worker that joined it: (its thread index, when it joined, when it finished its work there).
    pub workers: Vec<(usize, u64, u64)>,
}

/// What a region runs, written by its submitter before it opens the region's epoch.
struct Region {
    /// The task function; valid while its epoch is open or has workers joined.
    job: UnsafeCell<Option<Job>>,
    tasks: AtomicUsize,
    /// The region's task `i` is thread `i`'s part ([`Pool::for_each_part`]).
    parts: AtomicBool,
    /// Whether the region is traced: its workers write when they join and finish.
    traced: AtomicBool,
}

/// Each word that one thread writes and another reads in every region sits on cache lines of its own
/// (`CachePadded`): those lines are what a region costs (a line moves between cores in about 60 ns on
/// the 2-vCPU VMs).
struct Inner {
    threads: usize,
    /// `epoch << 48 | closed << 47 | the workers that joined the current region (bit me - 1 for worker
    /// me)`
    state: CachePadded<AtomicU64>,
    /// The workers that have finished their work in the current region (same bits).
    done: CachePadded<AtomicU64>,
    region: CachePadded<Region>,
    /// The next unclaimed task of a region of tasks.
    next: CachePadded<AtomicUsize>,
    /// Per part: how long it took (ns), written by the thread that ran it.
    took: Box<[CachePadded<AtomicU64>]>,
    /// Whether the next regions are traced ([`Pool::trace_start`]), and their records.
    tracing: AtomicBool,
    traces: Mutex<Vec<RegionTrace>>,
    /// The trace's clock starts here.
    base: Instant,
    /// Per worker, while tracing: when it joined the current region and when it finished its work there
    /// (ns on the trace's clock).
    joined_at: Box<[CachePadded<AtomicU64>]>,
    left_at: Box<[CachePadded<AtomicU64>]>,
    /// Each thread's learnt share of the pool's speed (sums to 1).
    shares: Mutex<Vec<f64>>,
    /// Whether the parts regions update `shares` ([`Pool::with_fixed_shares`] pools keep theirs).
    learn: bool,
    panicked: AtomicBool,
    /// One region at a time; a second submitter runs its region alone.
    submit: Mutex<()>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

impl Inner {
    /// Now on the trace's clock.
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

// SAFETY: `region.job` is written only by the holder of `submit` while no worker can read it (no open
// epoch and no joined worker), and read by workers only after joining an open epoch (Acquire on `state`).
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
        let threads = threads.clamp(1, MAX_THREADS);
        Self::build(vec![1.0 / threads as f64; threads], true)
    }

    /// A pool of one thread per share whose shares of the work stay `shares` (normalised) instead of
    /// being learnt: for tests of uneven splits, and for machines whose cores are known to differ.
    pub fn with_fixed_shares(shares: &[f64]) -> Arc<Pool> {
        assert!(!shares.is_empty() && shares.iter().all(|s| s.is_finite() && *s > 0.0), "shares must be positive: {shares:?}");
        assert!(shares.len() <= MAX_THREADS, "{} threads; a pool has at most {MAX_THREADS}", shares.len());
        let sum: f64 = shares.iter().sum();
        Self::build(shares.iter().map(|s| s / sum).collect(), false)
    }

    fn build(shares: Vec<f64>, learn: bool) -> Arc<Pool> {
        let threads = shares.len();
        let inner = Arc::new(Inner {
            threads,
            state: CachePadded::new(AtomicU64::new(0)),
            done: CachePadded::new(AtomicU64::new(0)),
            region: CachePadded::new(Region {
                job: UnsafeCell::new(None),
                tasks: AtomicUsize::new(0),
                parts: AtomicBool::new(false),
                traced: AtomicBool::new(false),
            }),
            next: CachePadded::new(AtomicUsize::new(0)),
            took: (0..threads).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            tracing: AtomicBool::new(false),
            traces: Mutex::new(Vec::new()),
            base: Instant::now(),
            joined_at: (0..threads).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            left_at: (0..threads).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            shares: Mutex::new(shares),
            learn,
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
                std::thread::Builder::new().name(format!("flotilla-compute-{i}")).spawn(move || worker(&inner, i)).expect("spawn a compute thread")
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

    /// Each thread's learnt share of the pool's speed, thread 0 (the submitter) first; they sum to 1.
    pub fn shares(&self) -> Vec<f64> {
        self.inner.shares.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `f(0)`, ..., `f(tasks - 1)`, spread over the pool; returns when all have run.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        self.region(tasks, false, &[], f);
    }

    /// Starts recording every parallel region this pool runs (a region that runs on its submitter alone,
    /// as on a one-thread pool or inside a task, is not one), dropping earlier records: a diagnostic of
    /// where a step's time goes (`flotilla bench engine --trace`). While on, each region costs a few
    /// clock reads and a record pushed under a mutex (after its end). Call it, and [`Pool::trace_stop`],
    /// between regions: a region open meanwhile may be lost or land in the next trace.
    pub fn trace_start(&self) {
        self.inner.traces.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.inner.tracing.store(true, Relaxed);
    }

    /// Stops recording and hands over the regions recorded since [`Pool::trace_start`], in the order
    /// they opened.
    pub fn trace_stop(&self) -> Vec<RegionTrace> {
        self.inner.tracing.store(false, Relaxed);
        std::mem::take(&mut *self.inner.traces.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Now on the trace's clock (nanoseconds since the pool was made).
    pub fn trace_ns(&self) -> u64 {
        self.inner.now()
    }

    /// `f(i)` for each of `sizes.len()` parts (at most one per thread), part `i` on thread `i` unless
    /// that thread is late (parked): the submitter runs the parts of the workers that had not joined the
    /// region when it finished its own; returns when all have run. `sizes[i]` is
    /// part `i`'s amount of work in any unit: when every part ran on its own thread, each thread's size
    /// over its time updates its share of the speed ([`Pool::shares`]).
    pub fn for_each_part(&self, sizes: &[usize], f: &(dyn Fn(usize) + Sync)) {
        let n = sizes.len();
        assert!(n <= self.inner.threads, "{n} parts for {} threads", self.inner.threads);
        if !self.region(n, true, sizes, f) || n != self.inner.threads || !self.inner.learn {
            return;
        }
        let inner = &*self.inner;
        let mut rates = [0f64; MAX_THREADS];
        for (i, &size) in sizes.iter().enumerate() {
            let ns = inner.took[i].load(Relaxed);
            if size == 0 || ns == 0 {
                return;
            }
            rates[i] = size as f64 / ns as f64;
        }
        let rates = &rates[..n];
        let total: f64 = rates.iter().sum();
        let mut shares = inner.shares.lock().unwrap_or_else(|e| e.into_inner());
        for (s, r) in shares.iter_mut().zip(rates) {
            *s += LEARN * (r / total - *s);
        }
        // every thread keeps at least half an even share, so a slow spell cannot starve it of the work
        // that would show it has recovered
        let least = 0.5 / n as f64;
        let mut floored = [false; MAX_THREADS];
        let floored = &mut floored[..n];
        loop {
            let sum: f64 = shares.iter().sum();
            shares.iter_mut().for_each(|s| *s /= sum);
            let mut changed = false;
            for (s, f) in shares.iter_mut().zip(floored.iter_mut()) {
                if *s < least {
                    (*s, *f, changed) = (least, true, true);
                }
            }
            if !changed {
                break;
            }
            // the floored shares stay at the floor; the others fill the rest
            let rest: f64 = shares.iter().zip(floored.iter()).filter(|(_, f)| !**f).map(|(s, _)| s).sum();
            let room = 1.0 - least * floored.iter().filter(|f| **f).count() as f64;
            shares.iter_mut().zip(floored.iter()).filter(|(_, f)| !**f).for_each(|(s, _)| *s *= room / rest);
        }
    }

    /// Runs the region; `true` when it ran on the pool with every part (of a parts region) on its own
    /// thread, `false` when it ran on this thread alone (one thread, one task, or a busy pool) or a late
    /// worker's part ran here. `sizes`: a parts region's sizes (for its trace).
    fn region(&self, tasks: usize, parts: bool, sizes: &[usize], f: &(dyn Fn(usize) + Sync)) -> bool {
        let inner = &*self.inner;
        if inner.threads == 1 || tasks <= 1 {
            (0..tasks).for_each(f);
            return false;
        }
        let Ok(_guard) = inner.submit.try_lock() else {
            (0..tasks).for_each(f);
            return false;
        };
        // SAFETY: the lifetime is erased only until this function returns, and it returns only after the
        // epoch is closed and every worker that joined it has left.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f) };
        unsafe { *inner.region.job.get() = Some(job) };
        inner.region.tasks.store(tasks, Relaxed);
        inner.region.parts.store(parts, Relaxed);
        if !parts {
            inner.next.store(0, Relaxed);
        }
        inner.done.store(0, Relaxed);
        let tracing = inner.tracing.load(Relaxed);
        inner.region.traced.store(tracing, Relaxed);
        let open = if tracing { self.trace_ns() } else { 0 };
        let epoch = (inner.state.load(Relaxed) >> EPOCH_SHIFT).wrapping_add(1) & 0xFFFF;
        inner.state.store(epoch << EPOCH_SHIFT, SeqCst);
        if inner.sleepers.load(SeqCst) > 0 {
            let _l = inner.lock.lock().unwrap_or_else(|e| e.into_inner());
            inner.wake.notify_all();
        }
        // the submitter runs tasks too: a region started inside one of them runs there alone, as on a worker
        let outer = IN_TASK.with(|w| w.replace(true));
        let mine = catch_unwind(AssertUnwindSafe(|| run_tasks(inner, f, 0)));
        let own_done = if tracing { self.trace_ns() } else { 0 };
        // Close the region: no worker joins it from now on. A joined worker runs its own part (or claims
        // tasks until none are left); the parts of the workers that had not joined run here.
        let joined = inner.state.fetch_or(CLOSED, AcqRel) & JOINED;
        let mut own = true;
        if parts {
            for i in (1..tasks).filter(|i| joined & (1 << (i - 1)) == 0) {
                own = false;
                if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                    inner.panicked.store(true, Relaxed);
                }
            }
        }
        IN_TASK.with(|w| w.set(outer));
        let others_done = if tracing { self.trace_ns() } else { 0 };
        while inner.done.load(Acquire) & joined != joined {
            std::hint::spin_loop();
        }
        let end = if tracing { self.trace_ns() } else { 0 };
        unsafe { *inner.region.job.get() = None };
        if tracing {
            // (the joined workers' times were written before their bits in `done`, read with Acquire)
            let workers = (1..inner.threads)
                .filter(|i| joined & (1 << (i - 1)) != 0)
                .map(|i| (i, inner.joined_at[i].load(Relaxed), inner.left_at[i].load(Relaxed)))
                .collect();
            let units = if parts { sizes.iter().sum() } else { tasks };
            let t = RegionTrace { tasks, parts, units, open, own_done, others_done, end, workers };
            inner.traces.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if inner.panicked.swap(false, Relaxed) {
            panic!("a compute task panicked");
        }
        own
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

/// Runs this thread's part of a parts region (part `me`, timed), or claims and runs tasks until none are
/// left; `me` is this thread's index in the pool (0: the submitter).
fn run_tasks(inner: &Inner, f: &(dyn Fn(usize) + Sync), me: usize) {
    let tasks = inner.region.tasks.load(Relaxed);
    if inner.region.parts.load(Relaxed) {
        if me < tasks {
            let started = Instant::now();
            if catch_unwind(AssertUnwindSafe(|| f(me))).is_err() {
                inner.panicked.store(true, Relaxed);
            }
            inner.took[me].store(started.elapsed().as_nanos() as u64, Relaxed);
        }
        return;
    }
    loop {
        let i = inner.next.fetch_add(1, Relaxed);
        if i >= tasks {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
            inner.panicked.store(true, Relaxed);
        }
    }
}

fn worker(inner: &Inner, me: usize) {
    IN_TASK.with(|w| w.set(true));
    let bit = 1u64 << (me - 1);
    let mut seen = 0u64;
    loop {
        // wait for a new epoch: spin, then park
        let started = Instant::now();
        let mut spins = 0u32;
        let s = loop {
            let s = inner.state.load(Acquire);
            if s >> EPOCH_SHIFT != seen || inner.shutdown.load(Relaxed) {
                break s;
            }
            spins += 1;
            if spins.is_multiple_of(256) && started.elapsed() > SPIN {
                let mut l = inner.lock.lock().unwrap_or_else(|e| e.into_inner());
                inner.sleepers.fetch_add(1, SeqCst);
                while inner.state.load(SeqCst) >> EPOCH_SHIFT == seen && !inner.shutdown.load(SeqCst) {
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
        seen = s >> EPOCH_SHIFT;
        // join the region unless it is already closed
        let mut cur = s;
        let joined = loop {
            if cur >> EPOCH_SHIFT != seen || cur & CLOSED != 0 {
                break false;
            }
            match inner.state.compare_exchange_weak(cur, cur | bit, AcqRel, Acquire) {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if joined {
            // (the submitter's choice for this region, written before it opened the epoch)
            let tracing = inner.region.traced.load(Relaxed);
            if tracing {
                inner.joined_at[me].store(inner.now(), Relaxed);
            }
            // SAFETY: joined an open epoch, so the submitter keeps the job alive until this worker leaves.
            if let Some(job) = unsafe { *inner.region.job.get() } {
                run_tasks(inner, unsafe { &*job }, me);
            }
            if tracing {
                inner.left_at[me].store(inner.now(), Relaxed);
            }
            inner.done.fetch_or(bit, Release);
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

/// The current pool's learnt shares of the speed, one per thread (`[1.0]` inside a task, where regions
/// run on one thread).
pub fn shares() -> Vec<f64> {
    if IN_TASK.with(|w| w.get()) {
        return vec![1.0];
    }
    CURRENT.with(|c| c.borrow().as_ref().map(|p| p.shares())).unwrap_or_else(|| current().shares())
}

/// `0..units` cut into one consecutive range per share, sized so that the largest `size / share` (when
/// the last thread finishes, each working at its share of the speed) is as small as whole units allow:
/// each its share of `units` rounded down, then each unit left over to the thread that would finish it
/// soonest, the first on ties (equal shares give sizes within one, the larger first). A range may be
/// empty when there are fewer units than shares.
pub fn cut(units: usize, shares: &[f64]) -> Vec<std::ops::Range<usize>> {
    let total: f64 = shares.iter().sum();
    let share: Vec<f64> = shares.iter().map(|s| s / total).collect();
    let mut sizes: Vec<usize> = share.iter().map(|s| ((units as f64 * s) as usize).min(units)).collect();
    // (rounding can leave the floors one over `units`)
    while sizes.iter().sum::<usize>() > units {
        let i = (0..sizes.len()).max_by(|&a, &b| (sizes[a] as f64 / share[a]).total_cmp(&(sizes[b] as f64 / share[b]))).expect("at least one share");
        sizes[i] -= 1;
    }
    while sizes.iter().sum::<usize>() < units {
        let finish = |i: usize| (sizes[i] + 1) as f64 / share[i];
        let i = (0..sizes.len()).min_by(|&a, &b| finish(a).total_cmp(&finish(b))).expect("at least one share");
        sizes[i] += 1;
    }
    let mut start = 0;
    sizes
        .iter()
        .map(|n| {
            start += n;
            start - n..start
        })
        .collect()
}

/// `f(i)` for each part `i` of `sizes.len()` (one per thread of the current pool), part `i` on thread
/// `i`, the time each took teaching the pool its threads' speeds ([`Pool::for_each_part`]).
pub fn for_each_part(sizes: &[usize], f: impl Fn(usize) + Sync) {
    if IN_TASK.with(|w| w.get()) {
        return (0..sizes.len()).for_each(f);
    }
    current().for_each_part(sizes, &f)
}

/// [`for_each_part`] over items, `sizes[i]` the work in `items[i]`.
pub fn each_part_mut<T: Send>(items: &mut [T], sizes: &[usize], f: impl Fn(usize, &mut T) + Sync) {
    assert_eq!(items.len(), sizes.len(), "one size per item");
    if items.len() < 2 || current_threads() == 1 {
        return items.iter_mut().enumerate().for_each(|(i, x)| f(i, x));
    }
    let slots: Vec<Mutex<&mut T>> = items.iter_mut().map(Mutex::new).collect();
    for_each_part(sizes, |i| f(i, &mut slots[i].lock().unwrap_or_else(|e| e.into_inner())));
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
                // parts: a worker that joins late, or after its part ran elsewhere, runs nothing twice
                let parts = 1 + round % 3;
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                for_each_part(&vec![1; parts], |i| {
                    hits[i].fetch_add(1, Relaxed);
                    (0..round % 50).for_each(|_| std::hint::spin_loop());
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}, {parts} parts");
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
    fn cut_follows_the_shares_in_whole_units() {
        assert_eq!(cut(36, &[0.5, 0.5]), vec![0..18, 18..36]);
        assert_eq!(cut(9, &[0.5, 0.5]), vec![0..5, 5..9], "the larger first");
        assert_eq!(cut(7, &[1.0, 1.0, 1.0]), vec![0..3, 3..5, 5..7]);
        assert_eq!(cut(8, &[0.36, 0.64]), vec![0..3, 3..8]);
        assert_eq!(cut(8, &[0.54, 0.46]), vec![0..4, 4..8], "4:4 finishes sooner than 5:3 at these speeds");
        assert_eq!(cut(1, &[0.5, 0.5]), vec![0..1, 1..1]);
        assert_eq!(cut(0, &[0.5, 0.5]), vec![0..0, 0..0]);
        for shares in [vec![1.0], vec![0.3, 0.7], vec![0.25, 0.25, 0.5], vec![0.1, 0.2, 0.3, 0.4]] {
            for units in 0..200 {
                let parts = cut(units, &shares);
                assert_eq!(parts.len(), shares.len());
                assert_eq!((parts[0].start, parts[parts.len() - 1].end), (0, units));
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                for (p, s) in parts.iter().zip(&shares) {
                    assert!((p.len() as f64 - units as f64 * s).abs() <= 1.0 + 1e-9, "{units} units, shares {shares:?}: {parts:?}");
                }
            }
        }
    }

    #[test]
    fn a_thread_whose_parts_take_longer_is_given_a_smaller_share() {
        let pool = Pool::new(2);
        assert_eq!(pool.shares(), vec![0.5, 0.5]);
        let spin = |d: Duration| {
            let t = Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
        };
        // part 1 takes three times as long per unit as part 0: thread 1 has a quarter of the speed. Only
        // regions whose parts all ran on their own threads teach, so the bound is a time (20 s), not a
        // count of regions: a loaded machine may run the worker late for many regions in a row
        let (mut rounds, started) = (0, Instant::now());
        while pool.shares()[0] < 0.65 && started.elapsed() < Duration::from_secs(20) {
            pool.for_each_part(&[10, 10], &|i| spin(Duration::from_micros(if i == 0 { 20 } else { 60 })));
            rounds += 1;
        }
        let s = pool.shares();
        assert!(s[0] >= 0.65 && (s[0] + s[1] - 1.0).abs() < 1e-9, "shares {s:?} after {rounds} regions");
        // parts of no work teach nothing; every part runs once whoever runs it
        let before = pool.shares();
        let hits: Vec<AtomicUsize> = (0..2).map(|_| AtomicUsize::new(0)).collect();
        pool.for_each_part(&[0, 5], &|i| {
            hits[i].fetch_add(1, Relaxed);
        });
        assert_eq!(pool.shares(), before);
        assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
        // the least share is half an even one
        for _ in 0..200 {
            pool.for_each_part(&[10, 10], &|i| spin(Duration::from_micros(if i == 0 { 5 } else { 200 })));
        }
        assert!(pool.shares()[1] >= 0.25 - 1e-9, "{:?}", pool.shares());
    }

    #[test]
    fn a_pool_has_at_most_max_threads() {
        assert_eq!(Pool::new(MAX_THREADS + 5).threads(), MAX_THREADS);
        assert_eq!(Pool::new(0).threads(), 1);
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
    fn a_trace_records_each_parallel_region_once_in_order_while_on() {
        let pool = Pool::new(2);
        pool.for_each(4, &|_| {});
        // a trace started again drops what the one before recorded
        pool.trace_start();
        pool.for_each(4, &|_| {});
        pool.trace_start();
        let started = pool.trace_ns();
        // parts long enough for the worker to join most of them
        let work = |us: u64| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(us) {
                std::hint::spin_loop();
            }
        };
        // the first region's own part waits (10 s at most) for the worker to start its part, so the
        // worker joins at least that region even when a loaded machine runs its thread late
        let second_started = AtomicBool::new(false);
        for i in 0..40 {
            pool.for_each_part(&[i + 1, 3], &|p| {
                if p == 1 {
                    second_started.store(true, SeqCst);
                } else if i == 0 {
                    let t = Instant::now();
                    while !second_started.load(SeqCst) && t.elapsed() < Duration::from_secs(10) {
                        std::thread::yield_now();
                    }
                }
                work(20)
            });
            // a region inside a task runs on that thread alone: only the outer one is recorded
            pool.for_each(5, &|_| pool.for_each(3, &|_| work(2)));
            // as does a region of one task
            pool.for_each(1, &|_| {});
        }
        let stopped = pool.trace_ns();
        let regions = pool.trace_stop();
        pool.for_each(4, &|_| {});
        assert_eq!(regions.len(), 80, "{regions:?}");
        for (i, r) in regions.iter().enumerate() {
            let (parts, units) = if i % 2 == 0 { (true, i / 2 + 4) } else { (false, 5) };
            assert_eq!((r.parts, r.units, r.tasks), (parts, units, if parts { 2 } else { 5 }), "{r:?}");
            assert!(started <= r.open && r.open <= r.own_done && r.own_done <= r.others_done && r.others_done <= r.end && r.end <= stopped, "{r:?}");
            for &(w, joined, left) in &r.workers {
                assert!(w == 1 && r.open <= joined && joined <= left && left <= r.end, "{r:?}");
            }
        }
        assert!(regions.iter().any(|r| !r.workers.is_empty()), "the worker joined no region: {regions:?}");
        assert!(regions.windows(2).all(|w| w[0].end <= w[1].open));
        assert!(pool.trace_stop().is_empty(), "nothing is recorded while the trace is off");
        // a one-thread pool runs no parallel region
        let one = Pool::new(1);
        one.trace_start();
        one.for_each(8, &|_| {});
        assert!(one.trace_stop().is_empty());
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
