//! The OpenAI-compatible HTTP API of every node: `POST /v1/completions` (JSON or server-sent events),
//! `GET /v1/models`, `GET /health`, `GET /ready`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_actors::scheduler::{self, SchedulerMsg};
use flotilla_actors::sessions::{complete, Completion, ServeContext, ServeError};
use flotilla_actors::wire::Wire;
use flotilla_actors::worker::member;
use flotilla_engine::{ChatMessage, ChatTemplate, FinishReason, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

pub struct AppState {
    pub ctx: Arc<ServeContext>,
    pub model_id: String,
    pub chat: ChatTemplate,
    /// Bearer tokens accepted on `/v1/*` (none: no authentication).
    pub api_keys: Vec<String>,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(|| async { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], flotilla_actors::metrics::render()) }))
        .merge(v1)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route", "invalid_request_error", None) })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route", "invalid_request_error", None)
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// `Authorization: Bearer KEY` with a key from `http.api_keys`, when any is configured.
async fn authenticate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !st.api_keys.is_empty() {
        let key = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        if !key.is_some_and(|k| st.api_keys.iter().any(|a| a == k)) {
            let mut r = error(StatusCode::UNAUTHORIZED, "a valid API key is required: Authorization: Bearer KEY", "invalid_request_error", None);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: impl Into<String>, kind: &str, param: Option<&str>) -> Response {
    let body = json!({ "error": { "message": message.into(), "type": kind, "param": param, "code": status.as_u16() } });
    (status, Json(body)).into_response()
}

fn serve_error(e: ServeError) -> Response {
    match e {
        ServeError::Busy { .. } => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, e.to_string(), "rate_limit_error", None);
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        ServeError::Unavailable(_) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), "service_unavailable", None),
        ServeError::Invalid(_) => error(StatusCode::BAD_REQUEST, e.to_string(), "invalid_request_error", None),
        ServeError::Failed(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "server_error", None),
    }
}

async fn scheduler_status(ctx: &ServeContext) -> Result<flotilla_actors::work::SchedulerStatus, String> {
    let leader = ctx.identity.lock().expect("identity lock").leader.clone().ok_or("no leader yet")?;
    let s = member::<SchedulerMsg>(&scheduler::group(&leader)).ok_or_else(|| format!("the leader {leader} is not reachable"))?;
    match s.call(SchedulerMsg::Status, Some(Duration::from_secs(2))).await {
        Ok(ractor::rpc::CallResult::Success(Wire::Ok(st))) => Ok(st),
        _ => Err(format!("the leader {leader} did not answer")),
    }
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    match scheduler_status(&st.ctx).await {
        Ok(s) if s.ready => Json(json!({ "ready": true, "epoch": s.placement.map(|p| p.epoch) })).into_response(),
        Ok(s) => {
            let why = s.error.unwrap_or_else(|| "the placement is loading".into());
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": why }))).into_response()
        }
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": why }))).into_response(),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [{ "id": st.model_id, "object": "model", "created": 0, "owned_by": "flotilla" }] }))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `POST /v1/completions`, OpenAI's fields plus vLLM's `top_k`, `repetition_penalty`, `ignore_eos` and `return_token_ids`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    return_token_ids: bool,
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageIn {
    role: String,
    content: Content,
    #[allow(dead_code)]
    name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<MessageIn>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    return_token_ids: bool,
    logprobs: Option<bool>,
    #[allow(dead_code)]
    user: Option<String>,
}

/// The sampling fields both endpoints share.
struct Knobs {
    max_tokens: u32,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: bool,
}

impl Knobs {
    #[allow(clippy::result_large_err)] // the error is the response the handler returns
    fn params(self) -> Result<SamplingParams, Response> {
        let bad = |param: &str, msg: String| error(StatusCode::BAD_REQUEST, msg, "invalid_request_error", Some(param));
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > 16 || stop.iter().any(|s| s.is_empty()) {
            return Err(bad("stop", "stop takes at most 16 non-empty strings".into()));
        }
        if self.max_tokens == 0 {
            return Err(bad("max_tokens", "max_tokens must be at least 1".into()));
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p.unwrap_or(1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed.unwrap_or_else(rand::random),
            max_tokens: self.max_tokens,
            stop,
            ignore_eos: self.ignore_eos,
        };
        p.validate().map_err(|e| {
            let msg = e.to_string();
            let param = ["temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "max_tokens"]
                .into_iter()
                .find(|k| msg.contains(k));
            error(StatusCode::BAD_REQUEST, msg, "invalid_request_error", param)
        })?;
        Ok(p)
    }
}

/// The JSON body, or an OpenAI-shaped error (413 when over the size limit, 400 otherwise).
#[allow(clippy::result_large_err)] // the error is the response the handler returns
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(StatusCode::PAYLOAD_TOO_LARGE, "the request body is larger than http.max_body_bytes", "invalid_request_error", None)
        } else {
            error(StatusCode::BAD_REQUEST, format!("cannot read the request body: {r}"), "invalid_request_error", None)
        }
    })?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            error(StatusCode::BAD_REQUEST, format!("invalid request body: {inner}"), "invalid_request_error", None)
        } else {
            error(StatusCode::BAD_REQUEST, format!("invalid request body: {path}: {inner}"), "invalid_request_error", Some(&path))
        }
    })?;
    de.end().map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}"), "invalid_request_error", None))?;
    Ok(v)
}

#[allow(clippy::result_large_err)] // the error is the response the handler returns
fn check_model(st: &AppState, model: &Option<String>, n: Option<u32>) -> Result<(), Response> {
    if let Some(m) = model {
        if *m != st.model_id {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("model {m:?} is not served here; this cluster serves {:?}", st.model_id),
                "invalid_request_error",
                Some("model"),
            ));
        }
    }
    if n.is_some_and(|n| n != 1) {
        return Err(error(StatusCode::BAD_REQUEST, "only n = 1 is supported", "invalid_request_error", Some("n")));
    }
    Ok(())
}

fn unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: CompletionRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = check_model(&st, &req.model, req.n) {
        return e;
    }
    let tok = &st.ctx.tokenizer;
    let prompt = match &req.prompt {
        Prompt::Text(t) => tok.encode(t, true),
        Prompt::Texts(v) if v.len() == 1 => tok.encode(&v[0], true),
        Prompt::Texts(_) => {
            return error(StatusCode::BAD_REQUEST, "exactly one prompt per request is supported", "invalid_request_error", Some("prompt"))
        }
        Prompt::Tokens(ids) => match ids.iter().find(|&&t| t as usize >= tok.vocab_size()) {
            Some(t) => {
                return error(StatusCode::BAD_REQUEST, format!("token id {t} is outside the vocabulary"), "invalid_request_error", Some("prompt"))
            }
            None => Ok(ids.clone()),
        },
    };
    let prompt = match prompt {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot tokenize the prompt: {e}"), "invalid_request_error", Some("prompt")),
    };
    let knobs = Knobs {
        max_tokens: req.max_tokens.unwrap_or(16),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        stop: req.stop,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        ignore_eos: req.ignore_eos,
    };
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    serve(st, Kind::Text, prompt, knobs, req.stream, include_usage, req.return_token_ids).await
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: ChatRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = check_model(&st, &req.model, req.n) {
        return e;
    }
    if req.logprobs == Some(true) {
        return error(StatusCode::BAD_REQUEST, "logprobs are not supported", "invalid_request_error", Some("logprobs"));
    }
    if req.messages.is_empty() {
        return error(StatusCode::BAD_REQUEST, "messages must hold at least one message", "invalid_request_error", Some("messages"));
    }
    let mut msgs = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("messages[{i}].role {:?} is not one of system, user, assistant, tool", m.role),
                "invalid_request_error",
                Some("messages"),
            );
        }
        let text = match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => t.push_str(s),
                        _ => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                format!("messages[{i}]: only text content parts are supported"),
                                "invalid_request_error",
                                Some("messages"),
                            )
                        }
                    }
                }
                t
            }
        };
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        msgs.push(ChatMessage::new(role, text));
    }
    let text = match st.chat.render(&msgs, true) {
        Ok(t) => t,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("the chat template rejected the messages: {e}"), "invalid_request_error", Some("messages"))
        }
    };
    let prompt = match st.ctx.tokenizer.encode(&text, true) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot tokenize the messages: {e}"), "invalid_request_error", Some("messages")),
    };
    let knobs = Knobs {
        max_tokens: req.max_completion_tokens.or(req.max_tokens).unwrap_or_else(|| (st.ctx.context_length as u32).min(4096)),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        stop: req.stop,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        ignore_eos: req.ignore_eos,
    };
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    serve(st, Kind::Chat, prompt, knobs, req.stream, include_usage, req.return_token_ids).await
}

/// Runs a request and answers in the endpoint's shape, as one JSON body or as server-sent events.
async fn serve(st: Arc<AppState>, kind: Kind, prompt: Vec<u32>, knobs: Knobs, stream: bool, include_usage: bool, return_ids: bool) -> Response {
    let params = match knobs.params() {
        Ok(p) => p,
        Err(e) => return e,
    };
    if prompt.len() >= st.ctx.context_length {
        let msg = format!("the prompt has {} tokens; the context window is {}", prompt.len(), st.ctx.context_length);
        return error(StatusCode::BAD_REQUEST, msg, "invalid_request_error", Some(if kind == Kind::Chat { "messages" } else { "prompt" }));
    }
    let (prefix, object) = match kind {
        Kind::Text => ("cmpl", "text_completion"),
        Kind::Chat => ("chatcmpl", "chat.completion"),
    };
    let id = format!("{prefix}-{}-{:08x}", st.ctx.node, rand::random::<u32>());
    let created = unix_s();
    let model = st.model_id.clone();
    if !stream {
        return match complete(&st.ctx, prompt, params, |_| true).await {
            Ok(c) => {
                let mut choice = match kind {
                    Kind::Text => json!({ "index": 0, "text": c.text, "finish_reason": finish_name(c.finish), "logprobs": null }),
                    Kind::Chat => {
                        json!({ "index": 0, "message": { "role": "assistant", "content": c.text }, "finish_reason": finish_name(c.finish), "logprobs": null })
                    }
                };
                if return_ids {
                    choice["token_ids"] = json!(c.tokens);
                }
                Json(json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage(&c) }))
                    .into_response()
            }
            Err(e) => serve_error(e),
        };
    }
    // Streaming: the request runs in its own task; a closed channel (client gone) cancels it.
    let chunk_object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |text: Option<&str>, finish: Option<&str>| {
            let choice = match kind {
                Kind::Text => json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null }),
                Kind::Chat => {
                    let delta = match text {
                        Some(t) => json!({ "content": t }),
                        None => json!({}),
                    };
                    json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null })
                }
            };
            json!({ "id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice] })
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    if kind == Kind::Chat {
        let mut first = chunk(Some(""), None);
        first["choices"][0]["delta"]["role"] = json!("assistant");
        let _ = tx.send(first);
    }
    let ctx = st.ctx.clone();
    tokio::spawn(async move {
        let c2 = chunk.clone();
        let tx2 = tx.clone();
        let result = complete(&ctx, prompt, params, move |piece| tx2.send(c2(Some(piece), None)).is_ok()).await;
        match result {
            Ok(c) => {
                let mut last = chunk(None, Some(finish_name(c.finish)));
                if return_ids {
                    last["choices"][0]["token_ids"] = json!(c.tokens);
                }
                let _ = tx.send(last);
                if include_usage {
                    let _ =
                        tx.send(json!({ "id": id, "object": chunk_object, "created": created, "model": model, "choices": [], "usage": usage(&c) }));
                }
            }
            Err(e) => {
                let (status, kind) = match &e {
                    ServeError::Busy { .. } => (429, "rate_limit_error"),
                    ServeError::Unavailable(_) => (503, "service_unavailable"),
                    ServeError::Invalid(_) => (400, "invalid_request_error"),
                    ServeError::Failed(_) => (500, "server_error"),
                };
                let _ = tx.send(json!({ "error": { "message": e.to_string(), "type": kind, "param": null, "code": status } }));
            }
        }
    });
    let events = UnboundedReceiverStream::new(rx)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn usage(c: &Completion) -> Value {
    json!({ "prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens.len(), "total_tokens": c.prompt_tokens + c.tokens.len() })
}
