//! Request sessions. The node that receives a request owns it: the prompt, the sampling parameters
//! and the tokens emitted so far live in the task that serves the client ([`complete`]). The
//! sessions actor (process group `sessions:{node}`) is that node's mailbox for tokens and failures
//! sent by last stages; it hands each to the request's task.
//!
//! A request is driven one token at a time: admit (active scheduler) -> first step with the prompt to
//! stage 0 -> the last stage samples token `i` and sends it here -> this task checks end of
//! sequence, stop strings and limits, and sends the token to stage 0 as the next step. A step that a
//! worker refuses (stale epoch, lost cache, lost stage) is retried: the session asks for a pipeline
//! again and sends the prompt plus every token emitted so far, so the new pipeline continues at the
//! next token index; seeded sampling depends only on (seed, index), so the output is unchanged.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_engine::{FinishReason, SamplingParams, TextStream, Tokenizer};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorClusterMessage;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::membership::SharedIdentity;
use crate::protocol::SCOPE;
use crate::scheduler::{self, SchedulerMsg};
use crate::wire::Wire;
use crate::work::{AdmitReply, AdmitReq, FirstStep, Release, ReqId, SeqFailure, SeqWork, SessionBatch, TokenOut};
use crate::worker::{self, member, WorkerMsg};

/// Process group of the sessions actor on `node`.
pub fn group(node: &str) -> String {
    format!("sessions:{node}")
}

/// Longest wait for the next token before a request is retried.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for admission (includes time in the scheduler's queue).
const ADMIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Pipelines a request may try before it fails.
const MAX_ATTEMPTS: u32 = 8;
/// How often a waiting request checks that every stage of its pipeline is still in the mesh.
const LIVENESS_CHECK: Duration = Duration::from_millis(100);
/// Pause before re-admission, times the number of earlier retries.
const RETRY_PAUSE: Duration = Duration::from_millis(150);
/// A route through a node that is gone is asked for again after this pause, up to this many times (5 s).
const STALE_ROUTE_PAUSE: Duration = Duration::from_millis(25);
const MAX_STALE_ROUTES: u32 = 200;
/// How often a request under way that found no full placement asks again.
const CAPACITY_POLL: Duration = Duration::from_millis(250);
/// A scheduler that is not (or stopped being) the leader's sends the request to the leader of this
/// node's view after this pause, for at most `LEADER_WAIT` (views converge within a heartbeat or two).
const LEADER_POLL: Duration = Duration::from_millis(50);
const LEADER_WAIT: Duration = Duration::from_secs(5);

enum Event {
    Token(TokenOut),
    Failed(SeqFailure),
}

/// Open requests of this node, by id.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<HashMap<u64, UnboundedSender<Event>>>>);

impl Registry {
    /// Requests this node is serving now.
    pub fn len(&self) -> usize {
        self.0.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(RactorClusterMessage)]
pub enum SessionsMsg {
    /// Tokens and failures from workers.
    Deliver(Wire<SessionBatch>),
}

pub struct Sessions;

pub struct SessionsArgs {
    pub node: String,
    pub registry: Registry,
}

impl Actor for Sessions {
    type Msg = SessionsMsg;
    type State = SessionsArgs;
    type Arguments = SessionsArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: SessionsArgs) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join_scoped(SCOPE.to_string(), group(&args.node), vec![myself.get_cell()]);
        Ok(args)
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionsMsg::Deliver(Wire::Ok(batch)) => {
                let reg = st.registry.0.lock().expect("registry lock");
                for t in batch.tokens {
                    if let Some(tx) = reg.get(&t.req.id).filter(|_| t.req.origin == st.node) {
                        let _ = tx.send(Event::Token(t));
                    }
                }
                for f in batch.failures {
                    if let Some(tx) = reg.get(&f.req.id).filter(|_| f.req.origin == st.node) {
                        let _ = tx.send(Event::Failed(f));
                    }
                }
            }
            SessionsMsg::Deliver(Wire::Bad(e)) => tracing::warn!(error = %e, "sessions ignore an undecodable delivery"),
        }
        Ok(())
    }
}

/// Counts a request in `flotilla_num_requests_running` while it lives.
struct RunningGauge;

impl RunningGauge {
    fn new() -> Self {
        crate::metrics::m().requests_running.inc();
        RunningGauge
    }
}

impl Drop for RunningGauge {
    fn drop(&mut self) {
        crate::metrics::m().requests_running.dec();
    }
}

/// What a node needs to serve requests.
pub struct ServeContext {
    pub node: String,
    pub identity: SharedIdentity,
    pub registry: Registry,
    pub tokenizer: Tokenizer,
    pub context_length: usize,
    /// How long a request under way waits for a full placement to resume on (`http.resume_wait_ms`).
    pub resume_wait: Duration,
    next_id: AtomicU64,
}

impl ServeContext {
    pub fn new(
        node: String,
        identity: SharedIdentity,
        registry: Registry,
        tokenizer: Tokenizer,
        context_length: usize,
        resume_wait: Duration,
    ) -> Self {
        Self { node, identity, registry, tokenizer, context_length, resume_wait, next_id: AtomicU64::new(1) }
    }
}

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the cluster is busy: {queued} requests are waiting")]
    Busy { queued: u32 },
    #[error("no full placement is available: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: ReqId,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    /// Pipelines tried (more than one after a retry).
    pub attempts: u32,
}

/// Where a request currently runs.
#[derive(Clone)]
struct Route {
    /// Stage 0's worker, looked up once per attempt (not per token).
    stage0: Option<ActorRef<WorkerMsg>>,
    epoch: u64,
    replica: u32,
    stages: Vec<String>,
}

/// Whether `node`'s worker is missing from this node's view of the mesh (left, killed, cut off).
fn unreachable_node(node: &str) -> bool {
    member::<WorkerMsg>(&worker::group(node)).is_none()
}

fn leader_scheduler(ctx: &ServeContext) -> Result<ActorRef<SchedulerMsg>, ServeError> {
    let leader = ctx.identity.lock().expect("identity lock").leader.clone().ok_or_else(|| ServeError::Unavailable("no leader yet".into()))?;
    member::<SchedulerMsg>(&scheduler::group(&leader)).ok_or_else(|| ServeError::Unavailable(format!("the leader {leader} has no scheduler")))
}

async fn admit(ctx: &ServeContext, req: &ReqId, prompt_tokens: usize, max_tokens: u32, avoid: &BTreeSet<String>) -> Result<Route, ServeError> {
    // Only nodes still unreachable from here: a link that healed is usable again.
    let avoid: Vec<String> = avoid.iter().filter(|n| unreachable_node(n)).cloned().collect();
    let asked = Instant::now();
    loop {
        let sched = leader_scheduler(ctx)?;
        let ask = AdmitReq { req: req.clone(), prompt_tokens: prompt_tokens as u32, max_tokens, avoid: avoid.clone() };
        return match sched.call(|p| SchedulerMsg::Admit(Wire::Ok(ask), p), Some(ADMIT_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::Admitted { epoch, replica, stages }))) => {
                let stage0 = member::<WorkerMsg>(&worker::group(&stages[0]));
                Ok(Route { stage0, epoch, replica, stages })
            }
            Ok(ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::NotLeader(why)))) => {
                if asked.elapsed() < LEADER_WAIT {
                    tracing::debug!(%req, reason = %why, "asked a scheduler that does not lead; asking the leader again");
                    tokio::time::sleep(LEADER_POLL).await;
                    continue;
                }
                Err(ServeError::Unavailable(format!("the nodes did not agree on a leader within {LEADER_WAIT:?}: {why}")))
            }
            Ok(ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::Busy { queued }))) => Err(ServeError::Busy { queued }),
            Ok(ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::Unavailable(why)))) => Err(ServeError::Unavailable(why)),
            Ok(ractor::rpc::CallResult::Success(Wire::Bad(e))) => Err(ServeError::Failed(format!("undecodable admission: {e}"))),
            Ok(ractor::rpc::CallResult::Timeout) => Err(ServeError::Unavailable("no pipeline became free in time".into())),
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(ServeError::Unavailable("lost the scheduler".into())),
        };
    }
}

fn send_step(route: &Route, w: SeqWork) -> Result<(), String> {
    let stage0 = &route.stages[0];
    let wk = route.stage0.as_ref().ok_or_else(|| format!("stage 0 node {stage0} is unreachable"))?;
    wk.cast(WorkerMsg::Step(Wire::Ok(vec![w]))).map_err(|e| format!("stage 0 node {stage0}: {e}"))
}

fn release(ctx: &ServeContext, req: &ReqId, route: &Route) {
    for node in &route.stages {
        if let Some(w) = member::<WorkerMsg>(&worker::group(node)) {
            let _ = w.cast(WorkerMsg::Free(Wire::Ok(vec![req.clone()])));
        }
    }
    if let Ok(s) = leader_scheduler(ctx) {
        let _ = s.cast(SchedulerMsg::Release(Wire::Ok(Release { req: req.clone(), epoch: route.epoch, replica: route.replica })));
    }
}

/// Keeps the request's current id in the registry, and removes it when the request ends, however it ends.
struct Registered<'a> {
    ctx: &'a ServeContext,
    id: Option<u64>,
    tx: UnboundedSender<Event>,
    /// The pipeline of the current attempt: released (caches freed, slot returned) when the attempt
    /// ends, and when the request is dropped half-way (the client went away).
    route: Option<(ReqId, Route)>,
}

impl Registered<'_> {
    fn release(&mut self) {
        if let Some((req, route)) = self.route.take() {
            release(self.ctx, &req, &route);
        }
    }

    /// A fresh id for a new attempt: anything still in flight for the old one is dropped on arrival.
    fn renew(&mut self) -> ReqId {
        let id = self.ctx.next_id.fetch_add(1, Ordering::Relaxed);
        let mut reg = self.ctx.registry.0.lock().expect("registry lock");
        if let Some(old) = self.id.replace(id) {
            reg.remove(&old);
        }
        reg.insert(id, self.tx.clone());
        ReqId { origin: self.ctx.node.clone(), id }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.release();
        if let Some(id) = self.id {
            self.ctx.registry.0.lock().expect("registry lock").remove(&id);
        }
    }
}

/// Serves one request through the cluster. `on_text` gets each piece of text as it becomes final and
/// returns false when the client has gone (the request is then cancelled everywhere).
pub async fn complete(
    ctx: &ServeContext,
    prompt: Vec<u32>,
    params: SamplingParams,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Completion, ServeError> {
    params.validate().map_err(|e| ServeError::Invalid(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ServeError::Invalid("the prompt is empty".into()));
    }
    if prompt.len() >= ctx.context_length {
        return Err(ServeError::Invalid(format!("the prompt has {} tokens; the context window is {}", prompt.len(), ctx.context_length)));
    }
    let (tx, mut rx) = unbounded_channel();
    let mut registered = Registered { ctx, id: None, tx, route: None };
    let m = crate::metrics::m();
    let _running = RunningGauge::new();
    let started = Instant::now();
    let mut last_token: Option<Instant> = None;

    let mut stream = TextStream::new(&ctx.tokenizer, &params.stop);
    let mut output: Vec<u32> = Vec::new();
    let mut attempts = 0;
    let mut stale_routes = 0;
    // Stage nodes this session found gone (killed, hung, or only cut off from this node).
    let mut unreachable: BTreeSet<String> = BTreeSet::new();
    // Since when a request under way has found no full placement to resume on.
    let mut no_capacity_since: Option<Instant> = None;
    'attempt: loop {
        attempts += 1;
        let req = registered.renew();
        let asked = Instant::now();
        let admitted = match admit(ctx, &req, prompt.len() + output.len(), params.max_tokens, &unreachable).await {
            // A request under way (it lost its pipeline) waits a bounded time for capacity; a new one is refused at once.
            Err(ServeError::Unavailable(why)) if attempts > 1 => {
                let since = *no_capacity_since.get_or_insert_with(Instant::now);
                if since.elapsed() < ctx.resume_wait {
                    tracing::debug!(%req, reason = %why, "no full placement to resume on yet; waiting");
                    attempts -= 1;
                    tokio::time::sleep(CAPACITY_POLL).await;
                    continue 'attempt;
                }
                Err(ServeError::Unavailable(format!(
                    "the request lost its pipeline after {} tokens and no full placement came back within {:?}: {why}",
                    output.len(),
                    ctx.resume_wait
                )))
            }
            other => other,
        };
        let route = admitted.inspect_err(|e| {
            let reason = match e {
                ServeError::Busy { .. } => "busy",
                ServeError::Unavailable(_) => "unavailable",
                ServeError::Invalid(_) => "invalid",
                ServeError::Failed(_) => "failed",
            };
            m.request_failures.with_label_values(&[reason]).inc();
        })?;
        no_capacity_since = None;
        m.queue_time.observe(asked.elapsed().as_secs_f64());
        registered.route = Some((req.clone(), route.clone()));
        if let Some(gone) = route.stages.iter().find(|n| unreachable_node(n)) {
            // The scheduler has not yet planned around a node that just left (or that only this node cannot
            // reach): ask again shortly, avoiding it, without counting an attempt.
            unreachable.insert(gone.clone());
            registered.release();
            if stale_routes >= MAX_STALE_ROUTES {
                return Err(ServeError::Unavailable(format!("the placement still uses {gone}, which is gone")));
            }
            stale_routes += 1;
            attempts -= 1;
            tokio::time::sleep(STALE_ROUTE_PAUSE).await;
            continue 'attempt;
        }
        tracing::debug!(%req, epoch = route.epoch, replica = route.replica, stages = ?route.stages, attempt = attempts, resume_at = output.len(), "admitted");
        let mut tokens = prompt.clone();
        tokens.extend_from_slice(&output);
        let first = SeqWork {
            req: req.clone(),
            epoch: route.epoch,
            start: 0,
            tokens,
            hidden: Vec::new(),
            first: Some(FirstStep { params: params.clone(), n_prompt: prompt.len() as u32 }),
        };
        let mut problem = send_step(&route, first).err();
        let mut check = tokio::time::interval(LIVENESS_CHECK);
        let mut last_progress = Instant::now();
        while problem.is_none() {
            let ev = tokio::select! {
                ev = rx.recv() => ev.expect("the registry holds the sender while the request runs"),
                _ = check.tick() => {
                    // A stage whose node left the mesh (killed, hung and evicted, partitioned) sends nothing more: resume elsewhere now.
                    if let Some(gone) = route.stages.iter().find(|n| unreachable_node(n)) {
                        unreachable.insert(gone.clone());
                        problem = Some(format!("stage node {gone} is gone"));
                    } else if last_progress.elapsed() > STEP_TIMEOUT {
                        problem = Some(format!("no token within {STEP_TIMEOUT:?}"));
                    }
                    continue;
                }
            };
            last_progress = Instant::now();
            match ev {
                Event::Failed(f) => problem = Some(format!("{}: {}", f.node, f.reason)),
                Event::Token(t) if t.index as usize != output.len() || t.req != req => {
                    tracing::warn!(%req, index = t.index, expected = output.len(), "ignoring an out-of-order token")
                }
                Event::Token(t) => {
                    let now = Instant::now();
                    match last_token {
                        None => m.ttft.observe(now.duration_since(started).as_secs_f64()),
                        Some(prev) => m.itl.observe(now.duration_since(prev).as_secs_f64()),
                    }
                    last_token = Some(now);
                    let finish = if !params.ignore_eos && ctx.tokenizer.stop_ids().contains(&t.token) {
                        Some(FinishReason::Stop)
                    } else {
                        output.push(t.token);
                        let (delta, stopped) = stream.push(t.token).map_err(|e| ServeError::Failed(e.to_string()))?;
                        if !delta.is_empty() && !on_text(&delta) {
                            m.request_failures.with_label_values(&["cancelled"]).inc();
                            m.generation_tokens.inc_by(output.len() as u64);
                            return Err(ServeError::Failed("the client went away".into()));
                        }
                        if stopped {
                            Some(FinishReason::Stop)
                        } else if output.len() >= params.max_tokens as usize || prompt.len() + output.len() >= ctx.context_length {
                            Some(FinishReason::Length)
                        } else {
                            None
                        }
                    };
                    if let Some(finish) = finish {
                        tracing::debug!(%req, tokens = output.len(), ?finish, "finished");
                        registered.release();
                        m.request_success.with_label_values(&[if finish == FinishReason::Stop { "stop" } else { "length" }]).inc();
                        m.e2e.observe(started.elapsed().as_secs_f64());
                        m.prompt_tokens.inc_by(prompt.len() as u64);
                        m.generation_tokens.inc_by(output.len() as u64);
                        let rest = stream.finish();
                        if !rest.is_empty() {
                            on_text(&rest);
                        }
                        return Ok(Completion {
                            id: req,
                            prompt_tokens: prompt.len(),
                            tokens: output,
                            text: stream.text().to_string(),
                            finish,
                            attempts,
                        });
                    }
                    let step = SeqWork {
                        req: req.clone(),
                        epoch: route.epoch,
                        start: (prompt.len() + output.len() - 1) as u32,
                        tokens: vec![t.token],
                        hidden: Vec::new(),
                        first: None,
                    };
                    problem = send_step(&route, step).err();
                }
            }
        }
        let why = problem.expect("the loop ends with a problem");
        registered.release();
        if attempts >= MAX_ATTEMPTS {
            m.request_failures.with_label_values(&["failed"]).inc();
            return Err(ServeError::Failed(format!("gave up after {attempts} pipelines: {why}")));
        }
        m.requests_resumed.inc();
        tracing::warn!(%req, attempt = attempts, reason = %why, emitted = output.len(), "resuming the request on a new pipeline");
        // Later attempts give the membership and the scheduler more time to see a loss and plan around it.
        tokio::time::sleep(RETRY_PAUSE * (attempts - 1)).await;
        // The next attempt has a new id: whatever the abandoned pipeline still sends is dropped.
        while rx.try_recv().is_ok() {}
        continue 'attempt;
    }
}
