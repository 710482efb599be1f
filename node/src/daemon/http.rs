//! The OpenAI-compatible HTTP API every daemon serves (`[api]`; wire types in `crate::openai`):
//! `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, streamed as server-sent events
//! or not. A generation is a job like `bitnode submit infer`'s: it goes to the job manager's control
//! mailbox, so the scheduler picks the device (this one or a paired peer), failover applies, and the
//! device that ran it is named in the `x-bitnode-device` header and the body's `bitnode` object.
//!
//! Checked on every request, before anything else:
//! - `Host`, when the API listens on loopback: it must name a loopback address. A web page the user opens
//!   can reach a loopback port, and DNS rebinding would make its requests look same-origin; such a
//!   request carries the attacker's host name.
//! - `Origin`, when a browser sends one: only the origins in `[api] cors_origins` (and the API's own
//!   origin) may call it, and only they get CORS headers. Otherwise any page could drive the user's mesh.
//! - the token, when `[api] token` is set.
//!
//! A client that disconnects cancels its generation (the job manager's `cancel_on_disconnect`), on
//! whichever device runs it.
use super::*;
use crate::config::ApiSection;
use crate::openai::{self, ApiError, Ask, Usage};
use bitnode_protocol::InferRequest;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

type Body = BoxBody<Bytes, Infallible>;
type Resp = hyper::Response<Body>;

/// What every request handler shares.
pub(super) struct Api {
    pub(super) home: PathBuf,
    pub(super) device: String,
    pub(super) token: Option<String>,
    pub(super) cors: Vec<String>,
    pub(super) loopback: bool,
    pub(super) port: u16,
    pub(super) max_body: u64,
    /// The job manager's and the network actor's control mailboxes.
    pub(super) jobs: mpsc::Sender<Ctl>,
    pub(super) net: mpsc::Sender<Ctl>,
    /// What the scheduler needs to know of each model, by hash: read once (it loads the model).
    pub(super) sizing: Arc<Mutex<HashMap<String, Arc<crate::exec::ModelSizing>>>>,
}

/// Binds the API's address (`--api-listen`, else `[api] listen`). None: the API is off ("off"), or its
/// address is taken, which is logged: a second daemon on one machine (another home) still runs.
pub(super) async fn bind(cfg: &ApiSection, flag: Option<&str>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let listen = flag.unwrap_or(&cfg.listen).trim();
    if listen.is_empty() || listen == "off" {
        return Ok(None);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("[api] listen {listen:?} is not a host:port"))?
        .collect();
    let Some(addr) = addrs.first().copied() else {
        bail!("[api] listen {listen:?} resolves to no address");
    };
    let token = cfg.token.as_deref().is_some_and(|t| !t.is_empty());
    if !addrs.iter().all(|a| a.ip().is_loopback()) && !token {
        bail!(
            "[api] listen {listen} is not a loopback address, and no [api] token is set: anybody on the network \
             could use this mesh. Set [api] token (clients then send it as a bearer token), or listen on 127.0.0.1"
        );
    }
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) => {
            tracing::error!("the HTTP API is off: cannot listen on {addr}: {e} (set [api] listen, or --api-listen)");
            Ok(None)
        }
    }
}

/// Serves the API until the daemon stops (the task is aborted).
pub(super) async fn serve(listener: tokio::net::TcpListener, api: Arc<Api>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("HTTP API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(api.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                // A client that opens a connection and sends nothing must not hold it forever.
                .header_read_timeout(Duration::from_secs(30))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("HTTP API connection: {e}");
            }
        });
    }
}

fn json_response(status: u16, v: &serde_json::Value) -> Resp {
    let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Resp {
    json_response(e.status, &e.body())
}

async fn handle(api: Arc<Api>, req: hyper::Request<Incoming>) -> Result<Resp, Infallible> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let allowed_origin = origin.as_ref().filter(|o| origin_allowed(&api, o, req.headers()));
    let cors = allowed_origin.cloned();
    let mut resp = match route(&api, req, origin.is_some(), cors.is_some()).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    if let Some(o) = cors.and_then(|o| HeaderValue::from_str(&o).ok()) {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-bitnode-device"),
        );
    }
    Ok(resp)
}

/// The host part of a `Host` header, and its port.
fn split_host(h: &str) -> (&str, Option<&str>) {
    if let Some(rest) = h.strip_prefix('[') {
        // [::1]:port
        return match rest.split_once(']') {
            Some((host, port)) => (host, port.strip_prefix(':')),
            None => (h, None),
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (h, None),
    }
}

fn host_allowed(api: &Api, headers: &hyper::HeaderMap) -> bool {
    if !api.loopback {
        return true;
    }
    let Some(h) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let (host, port) = split_host(h);
    let loopback_name = host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let port_ok = port.is_none_or(|p| p.parse::<u16>() == Ok(api.port));
    loopback_name && port_ok
}

fn origin_allowed(api: &Api, origin: &str, headers: &hyper::HeaderMap) -> bool {
    if api.cors.iter().any(|c| c == origin || c == "*") {
        return true;
    }
    // The API's own origin (a page it serves itself); the Host is checked separately.
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    !host.is_empty() && origin == format!("http://{host}")
}

fn forbidden(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(403, "invalid_request_error", code, msg)
}

async fn route(api: &Api, req: hyper::Request<Incoming>, has_origin: bool, cors_ok: bool) -> Result<Resp, ApiError> {
    if !host_allowed(api, req.headers()) {
        return Err(forbidden(
            "host_not_allowed",
            "the Host header must name this machine's loopback address (a page on another site may not use this API)",
        ));
    }
    if has_origin && !cors_ok {
        return Err(forbidden(
            "origin_not_allowed",
            "requests from this web origin are not allowed; list it in [api] cors_origins",
        ));
    }
    if req.method() == Method::OPTIONS {
        // A CORS preflight from an allowed origin.
        let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return Ok(r);
    }
    if let Some(t) = &api.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), t.as_bytes()) {
            return Err(ApiError::new(
                401,
                "invalid_request_error",
                "invalid_api_key",
                "a valid token is required: Authorization: Bearer <[api] token>",
            ));
        }
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/models") => models(api).await,
        (Method::POST, "/v1/completions") => complete(api, req, false).await,
        (Method::POST, "/v1/chat/completions") => complete(api, req, true).await,
        (_, "/v1/models" | "/v1/completions" | "/v1/chat/completions") => Err(ApiError::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed",
        )),
        _ => Err(ApiError::new(
            404,
            "invalid_request_error",
            "not_found",
            format!("no such endpoint: {path}"),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sends a control request to an actor and waits for its reply.
async fn ask_actor(to: &mpsc::Sender<Ctl>, req: Request) -> Result<Response, ApiError> {
    let (reply, rx) = oneshot::channel();
    let (events, _) = mpsc::channel(1);
    let gone = || ApiError::new(503, "server_error", "shutting_down", "the daemon is shutting down");
    to.send(Ctl { req, reply, events }).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

async fn models(api: &Api) -> Result<Resp, ApiError> {
    let home = api.home.clone();
    let local = tokio::task::spawn_blocking(move || crate::names::list(&home))
        .await
        .map_err(|e| ApiError::new(500, "server_error", "internal", e.to_string()))?
        .map_err(|e| ApiError::new(500, "server_error", "internal", format!("{e:#}")))?;
    let peers: Vec<PeerInfo> = ask_actor(&api.net, Request::Peers)
        .await?
        .into_result()
        .map_err(|e| ApiError::new(500, "server_error", "internal", e.to_string()))?;
    let mut data = vec![];
    let mut seen = HashSet::new();
    for m in local.iter().filter(|m| m.kind == "model") {
        let devices: Vec<&str> = std::iter::once(api.device.as_str())
            .chain(
                peers
                    .iter()
                    .filter(|p| p.connected && p.capabilities.as_ref().is_some_and(|c| c.models.contains(&m.hash)))
                    .map(|p| p.name.as_str()),
            )
            .collect();
        seen.insert(m.hash.clone());
        data.push(serde_json::json!({
            "id": m.name, "object": "model", "created": m.added_unix, "owned_by": api.device,
            "bitnode": {"hash": m.hash, "devices": devices},
        }));
    }
    // What connected peers hold and this device has no name for: by hash, with every peer that holds it
    // (a request for it is routed to one of them).
    let mut held: Vec<(&String, Vec<&str>)> = vec![];
    for p in peers.iter().filter(|p| p.connected) {
        for h in p.capabilities.iter().flat_map(|c| c.models.iter()) {
            if seen.contains(h) {
                continue;
            }
            match held.iter_mut().find(|(k, _)| *k == h) {
                Some((_, devices)) => devices.push(&p.name),
                None => held.push((h, vec![&p.name])),
            }
        }
    }
    for (h, devices) in held {
        data.push(serde_json::json!({
            "id": h, "object": "model", "created": 0, "owned_by": devices[0],
            "bitnode": {"hash": h, "devices": devices},
        }));
    }
    Ok(json_response(200, &serde_json::json!({"object": "list", "data": data})))
}

async fn read_body(req: hyper::Request<Incoming>, max: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is over {max} bytes ([api] max_request_bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), max as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad(format!("reading the request body: {e}"), None)),
    }
}

/// Where a model or adapter a request names is.
enum Found {
    /// In this device's store.
    Here { hash: String, dir: PathBuf },
    /// Not here, but connected paired peers advertise it (by hash): the job goes to one of them.
    Peer(String),
}

/// Finds the model or adapter `asked` (a name or a content hash) for the request parameter `param`: in
/// this device's store, else among what connected peers advertise (they advertise hashes, not names).
/// Not found: 404 when no device of the mesh is known to hold it; 503 when only paired peers that are not
/// connected now do (their last advert said so): it exists, but no device that holds it can serve now.
fn find(home: &Path, peers: &[PeerInfo], asked: &str, param: &'static str) -> Result<Found, ApiError> {
    let internal = |e: anyhow::Error| ApiError::new(500, "server_error", "internal", format!("{e:#}"));
    if let Some(m) = crate::names::resolve(home, asked).map_err(internal)? {
        let want = if param == "adapter" { "adapter" } else { "model" };
        if m.kind != want {
            let msg = if want == "model" {
                format!("{asked:?} is an adapter; name it in \"adapter\"")
            } else {
                format!("{asked:?} is not an adapter")
            };
            return Err(ApiError::bad(msg, Some(param)));
        }
        let dir = Store::new(home).resolve(&m.hash).map_err(internal)?.ok_or_else(|| {
            ApiError::new(
                404,
                "invalid_request_error",
                "model_not_found",
                format!("{} left the store", m.hash),
            )
        })?;
        return Ok(Found::Here { hash: m.hash, dir });
    }
    let holds = |p: &&PeerInfo| {
        p.capabilities
            .as_ref()
            .is_some_and(|c| c.models.iter().any(|h| h == asked))
    };
    if crate::models::valid_hash(asked) {
        if peers.iter().filter(holds).any(|p| p.connected) {
            return Ok(Found::Peer(asked.to_string()));
        }
        let away: Vec<&str> = peers.iter().filter(holds).map(|p| p.name.as_str()).collect();
        if !away.is_empty() {
            return Err(ApiError {
                param: Some(param),
                ..ApiError::new(
                    503,
                    "server_error",
                    "no_device",
                    format!(
                        "the {param} {asked} is held by {}, which {} not connected now",
                        away.join(", "),
                        if away.len() == 1 { "is" } else { "are" }
                    ),
                )
            });
        }
    }
    Err(ApiError {
        param: Some(param),
        ..ApiError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the {param} {asked:?} does not exist on this device or its peers (see /v1/models; a model only a \
                 peer holds is named by its hash)"
            ),
        )
    })
}

/// The model and adapter a request names, found here or on connected peers, and the job for them.
fn prepare(
    home: &Path,
    ask: &Ask,
    peers: &[PeerInfo],
    sizing: &Mutex<HashMap<String, Arc<crate::exec::ModelSizing>>>,
) -> Result<Request, ApiError> {
    let internal = |e: anyhow::Error| ApiError::new(500, "server_error", "internal", format!("{e:#}"));
    let model = find(home, peers, &ask.model, "model")?;
    let adapter = ask
        .adapter
        .as_deref()
        .map(|a| find(home, peers, a, "adapter"))
        .transpose()?;
    let hash = |f: &Found| match f {
        Found::Here { hash, .. } | Found::Peer(hash) => hash.clone(),
    };
    let infer = InferRequest {
        model: hash(&model),
        adapter: adapter.as_ref().map(hash),
        prompt: ask.prompt.clone(),
        max_tokens: ask.max_tokens,
        temperature: ask.temperature,
        top_k: 0,
        top_p: ask.top_p,
        repetition_penalty: 1.0,
        seed: ask.seed,
        messages: ask.messages.clone(),
        stop: ask.stop.clone(),
    };
    crate::exec::validate(&JobSpec::Infer(infer.clone())).map_err(|e| ApiError::bad(format!("{e:#}"), None))?;
    // The scheduler's estimate counts the conversation's text as the prompt.
    let text_bytes = match &ask.messages {
        Some(m) => m.iter().map(|m| m.content.len() as u64 + 16).sum(),
        None => ask.prompt.len() as u64,
    };
    let need = match &model {
        // Only the peers that hold it can size it; the scheduler ranks them on a nominal estimate.
        Found::Peer(_) => Need::unsized_inference(text_bytes, ask.max_tokens as u64),
        Found::Here { hash, dir } => {
            let cached = sizing.lock().unwrap_or_else(|e| e.into_inner()).get(hash).cloned();
            let sized = match cached {
                Some(s) => s,
                None => {
                    let s = Arc::new(crate::exec::ModelSizing::read(dir).map_err(internal)?);
                    sizing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(hash.clone(), s.clone());
                    s
                }
            };
            let adapter_dir = match &adapter {
                Some(Found::Here { dir, .. }) => Some(dir.as_path()),
                _ => None,
            };
            let lora = sized.lora_bytes(adapter_dir).map_err(internal)?;
            sized.need(text_bytes, ask.max_tokens as u64, lora)
        }
    };
    Ok(Request::Submit {
        spec: JobSpec::Infer(infer),
        data_path: None,
        need,
        to: ask.to.clone().unwrap_or_else(|| "auto".into()),
        out: None,
        resume: None,
        detach: false,
        cancel_on_disconnect: true,
    })
}

/// A response body fed from a channel (the server-sent events of a stream).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// One generation as the job's events tell it.
struct Run {
    events: mpsc::Receiver<Event>,
    reply: oneshot::Receiver<Response>,
    /// The text sent to the client so far, and this attempt's text: an inference that moves to another
    /// device after a failure starts again there, and what the client already has is not sent twice.
    sent: String,
    attempt: String,
    completion_tokens: usize,
    device: Option<(String, String)>,
}

/// What a generation came to.
struct Outcome {
    text: String,
    finish_reason: &'static str,
    usage: Usage,
    device: (String, String),
}

enum Step {
    /// New text for the client.
    Text(String),
    /// The device the job went to (first placement, or a failover).
    Placed,
    Done(Result<Outcome, ApiError>),
}

impl Run {
    async fn next(&mut self) -> Step {
        loop {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(Event::Placed { executed_by, name, .. }) => {
                        self.device = Some((executed_by, name));
                        return Step::Placed;
                    }
                    Some(Event::AttemptFailed { .. }) => {
                        self.attempt.clear();
                        self.completion_tokens = 0;
                    }
                    Some(Event::Tokens { ids, text }) => {
                        self.completion_tokens += ids.len();
                        self.attempt.push_str(&text);
                        if self.attempt.len() > self.sent.len() && self.attempt.starts_with(&self.sent) {
                            let new = self.attempt[self.sent.len()..].to_string();
                            self.sent.push_str(&new);
                            return Step::Text(new);
                        }
                    }
                    Some(_) => {}
                    // The stream ended: the reply follows.
                    None => return Step::Done(self.finish().await),
                },
                r = &mut self.reply => return Step::Done(self.finished(r.ok())),
            }
        }
    }

    async fn finish(&mut self) -> Result<Outcome, ApiError> {
        let r = (&mut self.reply).await.ok();
        self.finished(r)
    }

    fn finished(&mut self, r: Option<Response>) -> Result<Outcome, ApiError> {
        let gone = || ApiError::new(503, "server_error", "shutting_down", "the daemon is shutting down");
        let v: api::JobView = r
            .ok_or_else(gone)?
            .into_result()
            .map_err(|e| ApiError::new(400, "invalid_request_error", "invalid_value", e.to_string()))?;
        let device = match (&v.executed_by, &v.executed_by_name) {
            (Some(id), Some(name)) => (id.clone(), name.clone()),
            _ => self.device.clone().unwrap_or_default(),
        };
        if v.state != crate::jobs::State::Succeeded {
            let why = v.reason.unwrap_or_else(|| format!("{:?}", v.state));
            return Err(ApiError::new(
                503,
                "server_error",
                "no_device",
                format!("the generation failed: {why}"),
            ));
        }
        let res: bitnode_protocol::InferResult = v
            .result
            .and_then(|r| serde_json::from_value(r).ok())
            .ok_or_else(|| ApiError::new(500, "server_error", "internal", "the job returned no result"))?;
        let finish_reason = match res.stop_reason.as_str() {
            "eos" | "stop" => "stop",
            _ => "length",
        };
        Ok(Outcome {
            usage: Usage {
                prompt_tokens: res.prompt_tokens,
                completion_tokens: res.tokens.len(),
                total_tokens: res.prompt_tokens + res.tokens.len(),
            },
            text: res.text,
            finish_reason,
            device,
        })
    }
}

fn bitnode_obj(d: &(String, String)) -> serde_json::Value {
    serde_json::json!({"executed_by": d.0, "executed_by_name": d.1})
}

fn created() -> u64 {
    now_unix()
}

async fn complete(api: &Api, req: hyper::Request<Incoming>, chat: bool) -> Result<Resp, ApiError> {
    let body = read_body(req, api.max_body).await?;
    let parsed: openai::Body = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the body is not a valid request: {e}"),
        )
    })?;
    let ask = parsed.check(chat)?;
    // What connected peers hold, for a model this device does not.
    let peers: Vec<PeerInfo> = ask_actor(&api.net, Request::Peers)
        .await?
        .into_result()
        .map_err(|e| ApiError::new(500, "server_error", "internal", e.to_string()))?;
    let home = api.home.clone();
    let a = ask.clone();
    let sizing = api.sizing.clone();
    let submit = tokio::task::spawn_blocking(move || prepare(&home, &a, &peers, &sizing))
        .await
        .map_err(|e| ApiError::new(500, "server_error", "internal", e.to_string()))??;
    let (reply, reply_rx) = oneshot::channel();
    let (events, events_rx) = mpsc::channel(control::MAX_EVENT_BACKLOG);
    api.jobs
        .send(Ctl {
            req: submit,
            reply,
            events,
        })
        .await
        .map_err(|_| ApiError::new(503, "server_error", "shutting_down", "the daemon is shutting down"))?;
    let mut run = Run {
        events: events_rx,
        reply: reply_rx,
        sent: String::new(),
        attempt: String::new(),
        completion_tokens: 0,
        device: None,
    };
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, hex(&random::<12>()));
    let t = created();
    if !ask.stream {
        // Everything at once: the final text is the job's result.
        loop {
            match run.next().await {
                Step::Text(_) | Step::Placed => {}
                Step::Done(r) => {
                    let o = r?;
                    let choice = if chat {
                        serde_json::json!({"index": 0, "message": {"role": "assistant", "content": o.text},
                            "finish_reason": o.finish_reason, "logprobs": null})
                    } else {
                        serde_json::json!({"index": 0, "text": o.text, "finish_reason": o.finish_reason, "logprobs": null})
                    };
                    let body = serde_json::json!({
                        "id": id, "object": if chat { "chat.completion" } else { "text_completion" },
                        "created": t, "model": ask.model, "choices": [choice], "usage": o.usage,
                        "system_fingerprint": null, "bitnode": bitnode_obj(&o.device),
                    });
                    let mut r = json_response(200, &body);
                    device_header(&mut r, &o.device.1);
                    return Ok(r);
                }
            }
        }
    }
    // Streamed: the headers wait for the placement, so they can name the device.
    let mut early = None;
    let first = match run.next().await {
        Step::Placed => None,
        Step::Text(s) => Some(s),
        Step::Done(Err(e)) => return Err(e),
        // Ended before a placement event came through (its reply overtook it): answered whole below.
        Step::Done(Ok(o)) => {
            run.device = Some(o.device.clone());
            early = Some(o);
            None
        }
    };
    let device = run.device.clone().unwrap_or_default();
    let header_name = device.1.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let model = ask.model.clone();
    let include_usage = ask.include_usage;
    tokio::spawn(async move {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |text: Option<&str>, finish: Option<&str>, role: bool, dev: &(String, String)| {
            let choice = if chat {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                serde_json::json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            } else {
                serde_json::json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            };
            let v = serde_json::json!({"id": id, "object": object, "created": t, "model": model,
                "choices": [choice], "bitnode": bitnode_obj(dev)});
            Bytes::from(format!("data: {v}\n\n"))
        };
        // A send that fails means the client went away: returning drops the job's channels, and the job
        // manager cancels the generation.
        if chat && tx.send(chunk(None, None, true, &device)).await.is_err() {
            return;
        }
        if let Some(s) = first {
            if tx.send(chunk(Some(&s), None, false, &device)).await.is_err() {
                return;
            }
        }
        loop {
            // The reply is read once: an outcome that came before the headers is not waited for again.
            let step = match early.take() {
                Some(o) => Step::Done(Ok(o)),
                None => run.next().await,
            };
            match step {
                Step::Text(s) => {
                    let dev = run.device.clone().unwrap_or_default();
                    if tx.send(chunk(Some(&s), None, false, &dev)).await.is_err() {
                        return;
                    }
                }
                Step::Placed => {}
                Step::Done(Ok(o)) => {
                    // Whatever the streamed pieces did not carry (they add up to the text; this is a guard).
                    let rest = o.text.strip_prefix(run.sent.as_str()).unwrap_or("").to_string();
                    let text = (!rest.is_empty()).then_some(rest.as_str());
                    let _ = tx.send(chunk(text, Some(o.finish_reason), false, &o.device)).await;
                    if include_usage {
                        let v = serde_json::json!({"id": id, "object": object, "created": t, "model": model,
                            "choices": [], "usage": o.usage, "bitnode": bitnode_obj(&o.device)});
                        let _ = tx.send(Bytes::from(format!("data: {v}\n\n"))).await;
                    }
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
                Step::Done(Err(e)) => {
                    // The status line has gone out: the error travels as an event, as OpenAI's does.
                    let _ = tx.send(Bytes::from(format!("data: {}\n\n", e.body()))).await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            }
        }
    });
    let mut r = hyper::Response::new(ChannelBody(rx).boxed());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    device_header(&mut r, &header_name);
    Ok(r)
}

fn device_header(r: &mut Resp, name: &str) {
    // A device name is checked at pairing (`wire::check_name`); one that is not a valid header value is
    // left out rather than failing the response.
    if let Ok(v) = HeaderValue::from_str(name) {
        r.headers_mut().insert("x-bitnode-device", v);
    }
}
