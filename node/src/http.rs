//! The OpenAI-compatible HTTP API of every node: `POST /v1/completions` (JSON or server-sent events),
//! `GET /v1/models`, `GET /health`, `GET /ready`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_actors::scheduler::{self, SchedulerMsg};
use flotilla_actors::sessions::{complete, Completion, ServeContext, ServeError};
use flotilla_actors::wire::Wire;
use flotilla_actors::worker::member;
use flotilla_engine::{FinishReason, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

pub struct AppState {
    pub ctx: Arc<ServeContext>,
    pub model_id: String,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route", "invalid_request_error", None) })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
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
    // Accepted and ignored, as OpenAI clients send them.
    #[allow(dead_code)]
    user: Option<String>,
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

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}"), "invalid_request_error", None),
    };
    if let Some(m) = &req.model {
        if *m != st.model_id {
            return error(
                StatusCode::NOT_FOUND,
                format!("model {m:?} is not served here; this cluster serves {:?}", st.model_id),
                "invalid_request_error",
                Some("model"),
            );
        }
    }
    if req.n.is_some_and(|n| n != 1) {
        return error(StatusCode::BAD_REQUEST, "only n = 1 is supported", "invalid_request_error", Some("n"));
    }
    let tok = &st.ctx.tokenizer;
    let prompt = match &req.prompt {
        Prompt::Text(t) => tok.encode(t, true),
        Prompt::Texts(v) if v.len() == 1 => tok.encode(&v[0], true),
        Prompt::Texts(_) => {
            return error(StatusCode::BAD_REQUEST, "exactly one prompt per request is supported", "invalid_request_error", Some("prompt"))
        }
        Prompt::Tokens(ids) => Ok(ids.clone()),
    };
    let prompt = match prompt {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot tokenize the prompt: {e}"), "invalid_request_error", Some("prompt")),
    };
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0),
        top_p: req.top_p.unwrap_or(1.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        seed: req.seed.unwrap_or_else(rand::random),
        max_tokens: req.max_tokens.unwrap_or(16),
        stop: match req.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        ignore_eos: req.ignore_eos,
    };
    if let Err(e) = params.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string(), "invalid_request_error", None);
    }
    let id = format!("cmpl-{}-{}", st.ctx.node, rand::random::<u32>());
    let created = unix_s();
    if !req.stream {
        return match complete(&st.ctx, prompt, params, |_| true).await {
            Ok(c) => Json(body_of(&id, created, &st.model_id, &c, req.return_token_ids)).into_response(),
            Err(e) => serve_error(e),
        };
    }
    // Streaming: the request runs in its own task; a closed channel (client gone) cancels it.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let chunk = {
        let (id, model) = (id.clone(), st.model_id.clone());
        move |text: &str, finish: Option<&str>| {
            json!({ "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{ "index": 0, "text": text, "finish_reason": finish, "logprobs": null }] })
        }
    };
    let ctx = st.ctx.clone();
    let return_ids = req.return_token_ids;
    let model_id = st.model_id.clone();
    tokio::spawn(async move {
        let c2 = chunk.clone();
        let tx2 = tx.clone();
        let result = complete(&ctx, prompt, params, move |piece| tx2.send(c2(piece, None)).is_ok()).await;
        match result {
            Ok(c) => {
                let mut last = chunk("", Some(finish_name(c.finish)));
                if return_ids {
                    last["choices"][0]["token_ids"] = json!(c.tokens);
                }
                let _ = tx.send(last);
                if include_usage {
                    let _ = tx.send(json!({ "id": id, "object": "text_completion", "created": created, "model": model_id, "choices": [],
                        "usage": usage(&c) }));
                }
            }
            Err(e) => {
                let _ = tx.send(json!({ "error": { "message": e.to_string(), "type": "server_error", "param": null, "code": null } }));
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

fn body_of(id: &str, created: u64, model: &str, c: &Completion, return_ids: bool) -> Value {
    let mut choice = json!({ "index": 0, "text": c.text, "finish_reason": finish_name(c.finish), "logprobs": null });
    if return_ids {
        choice["token_ids"] = json!(c.tokens);
    }
    json!({ "id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice], "usage": usage(c) })
}
