"""The hybrid endpoint: retrieve from the release's collection, generate with its model, cite sources.

Two kinds of Ray Serve application:
- one application per loaded release, named by its release id (`build_release_app`): `Retriever`
  (embedder + Milvus hybrid search on the release's collection), `Generator` (the release's model on
  vLLM, `engine.py`), `BaseGenerator` (the base model, only with `serve.serve_base_model`) and `Release`,
  which answers a question end to end with that release only;
- `tunedex` (`build_app`): the `Ingress` with the HTTP routes (OpenAI-compatible, /v1/query, probes).

Release swap (`serving/control.py`): the new release's application is deployed beside the serving one
and becomes ready (model loaded), then the registry's `current.json` is switched. Each Ingress replica
re-reads that pointer (at most every `POLL_S`) and moves its one `active` reference; every request reads
that reference once, at its start, so in-flight requests finish on the release they started on.
"""


import asyncio
import functools
import hmac
import json
import re
import time
import uuid
from datetime import datetime
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from tunedex.infra.config import TunedexConfig, load_config
from tunedex.serving.engine import Generator, check_engine_kwargs
from tunedex.serving.generation import Prompt, Sampling
from tunedex.serving.prompt import (SYSTEM_PROMPT, GuardedStream, build_chat_messages, build_messages, guard_answer,
                                    source_entries, text_prompt)

api = FastAPI(title="tunedex", docs_url=None, redoc_url=None)
OPEN_ROUTES = {"/healthz", "/readyz"}  # probes carry no data; every other route needs the key when one is set


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme == "Bearer" and hmac.compare_digest(token.encode(), key.encode())


MAX_HEADERS = 100  # more header fields than this get 431, whatever their size


class BodyLimit:
    """431 for headers over `serve.max_header_bytes` or MAX_HEADERS fields; 413 for a body over
    `serve.max_body_bytes`, by its Content-Length before reading or as it streams in."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        app = scope.get("app")  # Starlette puts itself here before running its middleware
        limit = getattr(app.state, "max_body_bytes", None) if scope["type"] == "http" and app is not None else None
        if not limit:
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        header_bytes, header_limit = sum(len(k) + len(v) for k, v in headers), app.state.max_header_bytes
        if len(headers) > MAX_HEADERS or header_bytes > header_limit:
            return await openai_error(431, f"request headers are too large ({len(headers)} fields, {header_bytes} "
                                           f"bytes; at most {MAX_HEADERS} fields and serve.max_header_bytes="
                                           f"{header_limit})", "headers_too_large")(scope, receive, send)
        declared = dict(headers).get(b"content-length", b"")
        too_large = openai_error(413, f"request body is over {limit} bytes (serve.max_body_bytes)", "body_too_large")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        received, answered = 0, False

        async def counted() -> dict:
            # Over the limit: answer 413 now and tell the app the client left (FastAPI would turn
            # an exception raised while it reads the body into a 400).
            nonlocal received, answered
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit and not answered:
                answered = True
                await too_large(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def send_unless_answered(message: dict) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, send_unless_answered)


api.add_middleware(BodyLimit)


@api.middleware("http")
async def require_api_key(request: Request, call_next):
    key = getattr(request.app.state, "api_key", None)
    if key and request.url.path not in OPEN_ROUTES and not authorized(request.headers.get("authorization"), key):
        return JSONResponse(
            {"error": {"message": "missing or wrong API key; send `Authorization: Bearer <serve.api_key>`",
                       "type": "authentication_error"}},
            status_code=401, headers={"WWW-Authenticate": "Bearer"},
        )
    return await call_next(request)


class ServeArgs(BaseModel):
    """Arguments of `build_app`; Serve validates them at deploy time."""

    config: str = "configs/local.yaml"
    overrides: list[str] = Field(default_factory=list)


class QueryRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=50)
    filters: str = Field("", max_length=1000, description="Milvus boolean expression over doc_id/metadata")
    mode: Literal["hybrid", "rag", "finetuned", "retrieve"] = "hybrid"


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class ChatRequest(BaseModel):
    """OpenAI's chat request; parameters we do not honour are refused by name, not ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = Field(False, strict=True)


class CompletionRequest(BaseModel):
    """OpenAI's (legacy) completion request: raw text in, continuation out; one prompt per request."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = Field(False, strict=True)


IGNORED_OPENAI_PARAMS = {"user", "stream_options", "seed"}
POLL_S = 0.25  # how often an Ingress replica re-reads the registry's pointer to the promoted release


def openai_error(status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def retry_headers(error: dict[str, Any]) -> dict[str, str] | None:
    after = error.get("retry_after_s")
    return {"Retry-After": str(max(1, round(after)))} if after else None


def openai_request_problem(req: ChatRequest | CompletionRequest, release_id: str) -> JSONResponse | None:
    unsupported = sorted(set(req.model_extra or {}) - IGNORED_OPENAI_PARAMS)
    if unsupported:
        return openai_error(400, f"parameter(s) {', '.join(unsupported)} are not supported by this endpoint",
                            "unsupported_parameter", unsupported[0])
    if req.model not in (None, "tunedex", release_id):
        return openai_error(404, f"model {req.model!r} is not served here; use {release_id!r} (see /v1/models)",
                            "model_not_found", "model")
    if isinstance(req, ChatRequest) and not any(m.role == "user" for m in req.messages):
        return openai_error(400, "messages need at least one user message", "invalid_messages", "messages")
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list) and len(req.prompt) != 1:
        return openai_error(400, "send one prompt per request (a list of prompts is not supported)", "invalid_prompt",
                            "prompt")
    return None


def model_card(release: dict) -> dict[str, Any]:
    created = int(datetime.fromisoformat(release["created_at"]).timestamp())
    return {"id": release["release_id"], "object": "model", "created": created, "owned_by": "tunedex"}


async def sse_events(kind: str, completion_id: str, head: dict[str, Any], pieces: Any):
    """OpenAI chunk events (`chat` or `text` completions) from a `Release.stream`: its first item (`head`)
    carries the sources and release id, which go on the first event; the stream ends with [DONE]."""
    release_id = head["release_id"]
    base = {"id": completion_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": release_id}

    def event(text: str | None, finish: str | None = None, **extra: Any) -> str:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

    yield event(None, sources=head["sources"], release_id=release_id)
    async for piece in pieces:
        yield event(piece)
    yield event("", "stop")
    yield "data: [DONE]\n\n"


METRICS: dict[str, Any] = {}


def metrics() -> dict[str, Any]:
    """Application metrics, exported by Ray next to Serve's own (`ray_tunedex_*` on each node's metrics port)."""
    if not METRICS:
        from ray.serve import metrics as m

        tags = ("route", "status", "release_id", "mode")
        METRICS["requests"] = m.Counter("tunedex_requests", description="requests by route, status, release, mode",
                                        tag_keys=tags)
        METRICS["errors"] = m.Counter("tunedex_request_errors", description="4xx/5xx answers by route and status",
                                      tag_keys=tags)
        METRICS["latency"] = m.Histogram(
            "tunedex_request_latency_ms", description="time to the response head, by route",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000], tag_keys=tags)
    return METRICS


def route_label(request: Request) -> str:
    """The route's template (a bounded label set), also for requests refused before routing (401, 413)."""
    from starlette.routing import Match

    if path := getattr(request.scope.get("route"), "path", None):
        return path
    for candidate in leaf_routes(request.app.routes):
        if candidate.matches(request.scope)[0] != Match.NONE:
            return candidate.path
    return "unmatched"


def leaf_routes(routes: list[Any]) -> list[Any]:
    """Routes with a path, looking inside included routers (Serve's class-based routes live in one)."""
    out = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None) or getattr(route, "routes", None)
        out.extend(leaf_routes(inner) if inner else [route] if getattr(route, "path", None) else [])
    return out


@api.middleware("http")
async def record_metrics(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    tags = {"route": route_label(request), "status": str(response.status_code),
            "release_id": getattr(request.state, "release_id", ""), "mode": getattr(request.state, "mode", "")}
    m = metrics()
    m["requests"].inc(tags=tags)
    if response.status_code >= 400:
        m["errors"].inc(tags=tags)
    m["latency"].observe((time.perf_counter() - started) * 1000, tags=tags)
    return response


def deployment_options(cfg: TunedexConfig, name: str, **defaults: Any) -> dict[str, Any]:
    """Serve's own deployment options: our defaults, then `serve.deployments.<name>` from the config."""
    return {**defaults, **cfg.serve.deployments.get(name, {})}


@serve.deployment(name="Retriever")
class Retriever:
    def __init__(self, args: "ServeArgs", collection: str, embedding_model: str, consistency_level: str):
        from tunedex.infra import store
        from tunedex.infra.embedding import load_embedder

        cfg = load_config(args.config, args.overrides)
        # reads at the level the release recorded when it was promoted (older releases: the config's)
        self.milvus = cfg.milvus.model_copy(update={"consistency_level": consistency_level or cfg.milvus.consistency_level})
        self.collection = collection
        # the model that embedded this release's collection, whatever the config names today: a rollback
        # across an embedding-model change must not search old vectors with the new model
        self.embedder = load_embedder(cfg.embedding.model_copy(update={"model": embedding_model}))
        self.client = store.connect(cfg.milvus)
        self.client.load_collection(collection)

    async def retrieve(self, question: str, top_k: int, filters: str) -> list[Any] | dict[str, Any]:
        """The hits, or `{"error": ...}` (as data: exceptions do not cross handles cleanly) for a bad filter."""
        from pymilvus.exceptions import MilvusException

        from tunedex.infra import store

        vector = (await asyncio.to_thread(self.embedder.embed, [question]))[0]
        search = functools.partial(store.hybrid_search, self.client, self.milvus, self.collection, vector, question,
                                   top_k, filters)
        try:
            try:
                return await asyncio.to_thread(search)
            except MilvusException as exc:
                if not re.search(r"not loaded|released", str(exc), re.I):
                    raise
                # a restarted Milvus (Lite) holds its collections released: load again, once
                await asyncio.to_thread(self.client.load_collection, self.collection)
                return await asyncio.to_thread(search)
        except MilvusException as exc:
            reason = str(getattr(exc, "message", exc)).strip()
            if not filters or re.search(r"connect|unavailable|timeout|deadline", reason, re.I):
                raise
            first = reason.splitlines()[0] if reason else "rejected by Milvus"
            return RequestProblem(422, f"filters {filters!r} is not a valid Milvus expression: {first}").as_dict()


class RequestProblem(Exception):
    """A request this release cannot answer as asked (bad filter, a mode without its model: 4xx) or not now
    (the model's queue is full: Serve's backpressure status, 503 or 429, with its Retry-After)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": str(self), "retry_after_s": self.retry_after_s}}


def overloaded(exc: BackPressureError) -> RequestProblem:
    return RequestProblem(exc.status_code, f"the model is at capacity ({exc.message}); retry shortly",
                          exc.retry_after_s)


@serve.deployment(name="Release")
class Release:
    """One release end to end: retrieval from its collection, generation with its model, its sources."""

    def __init__(self, release: dict, retriever: DeploymentHandle, generator: DeploymentHandle,
                 base_generator: DeploymentHandle | None, top_k: int, system_prompt: str):
        self.release = release
        self.retriever = retriever
        self.generator = generator
        self.base_generator = base_generator
        self.top_k = top_k
        self.system_prompt = system_prompt

    async def info(self) -> dict[str, Any]:
        return self.release

    async def _retrieve(self, question: str, top_k: int | None, filters: str) -> list[Any]:
        hits = await self.retriever.retrieve.remote(question, top_k or self.top_k, filters)
        if isinstance(hits, dict):
            raise RequestProblem(hits["error"]["status"], hits["error"]["message"])
        return hits

    def _model(self, mode: str) -> DeploymentHandle:
        if mode != "rag":
            return self.generator
        if self.base_generator is None:
            raise RequestProblem(400, "mode 'rag' needs the release's base model loaded; set serve.serve_base_model: "
                                      "true (and promote a model whose card names its base) or use mode 'hybrid'")
        return self.base_generator

    async def answer(self, question: str, mode: str, top_k: int | None, filters: str) -> dict[str, Any]:
        """`/v1/query`: hybrid = fine-tuned + retrieval, rag = base + retrieval, finetuned = no retrieval.
        A request problem comes back as `{"error": {status, message}}` (plain data crosses handles cleanly)."""
        started = time.perf_counter()
        try:
            model = self._model(mode) if mode != "retrieve" else None
            hits = await self._retrieve(question, top_k, filters) if mode != "finetuned" else []
        except RequestProblem as exc:
            return exc.as_dict()
        timings = {"retrieve": round((time.perf_counter() - started) * 1000, 2)}
        answer = ""
        if model is not None:
            contexts = [h.text for h in hits] if mode in ("hybrid", "rag") else []
            gen_started = time.perf_counter()
            prompt = build_messages(question, contexts, system_prompt=self.system_prompt)
            try:
                text = await model.generate.remote(prompt, Sampling())
            except BackPressureError as exc:
                return overloaded(exc).as_dict()
            answer = guard_answer(text, self.system_prompt, contexts)
            timings["generate"] = round((time.perf_counter() - gen_started) * 1000, 2)
        timings["total"] = round((time.perf_counter() - started) * 1000, 2)
        return {"answer": answer, "sources": source_entries(hits), "release_id": self.release["release_id"],
                "mode": mode, "timings_ms": timings}

    async def _prompt(self, kind: str, payload: Any) -> tuple[Prompt, list[str], list[dict]]:
        question = next(m["content"] for m in reversed(payload) if m["role"] == "user") if kind == "chat" else payload
        hits = await self._retrieve(question, None, "")
        contexts = [h.text for h in hits]
        if kind == "chat":
            return build_chat_messages(payload, contexts, system_prompt=self.system_prompt), contexts, source_entries(hits)
        return text_prompt(payload, contexts), contexts, source_entries(hits)

    async def complete(self, kind: str, payload: Any, sampling: Sampling) -> dict[str, Any]:
        """OpenAI routes: `chat` (messages) or `text` (a raw prompt), retrieval on the question."""
        try:
            prompt, contexts, sources = await self._prompt(kind, payload)
            text = await self.generator.generate.remote(prompt, sampling)
        except RequestProblem as exc:
            return exc.as_dict()
        except BackPressureError as exc:
            return overloaded(exc).as_dict()
        text = guard_answer(text, self.system_prompt, contexts)
        return {"text": text, "sources": sources, "release_id": self.release["release_id"]}

    async def stream(self, kind: str, payload: Any, sampling: Sampling):
        """First the sources and release id (or an error), then the text pieces, through the output guard.
        The head waits for the first piece, so a full model queue is still an error status, not a broken stream."""
        try:
            prompt, contexts, sources = await self._prompt(kind, payload)
            pieces = self.generator.options(stream=True).stream.remote(prompt, sampling)
            first = await anext(pieces, "")
        except RequestProblem as exc:
            yield exc.as_dict()
            return
        except BackPressureError as exc:
            yield overloaded(exc).as_dict()
            return
        yield {"sources": sources, "release_id": self.release["release_id"]}
        guard = GuardedStream(self.system_prompt, contexts)
        if released := guard.feed(first):
            yield released
        async for piece in pieces:
            if released := guard.feed(piece):
                yield released
        if rest := guard.close():
            yield rest


class ReleaseArgs(ServeArgs):
    """Arguments of `build_release_app`; no `release_id` = the promoted one."""

    release_id: str | None = None


class Active(BaseModel):
    """The release an Ingress replica routes new requests to."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    release: dict[str, Any]
    handle: Any

    @property
    def release_id(self) -> str:
        return self.release["release_id"]


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, args: ServeArgs):
        cfg = load_config(args.config, args.overrides)
        api.state.api_key = cfg.serve.api_key
        api.state.max_body_bytes = cfg.serve.max_body_bytes
        api.state.max_header_bytes = cfg.serve.max_header_bytes
        self.max_prompt_chars = cfg.serve.max_prompt_chars
        self.max_new_tokens = cfg.serve.max_new_tokens
        self.registry = cfg.registry_dir
        self.active: Active | None = None
        self.pending: str | None = None  # promoted in the registry but its application is not running
        self._seen: tuple | None = None
        self._checked = 0.0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Follow the registry's pointer: move `active` to the promoted release once its application runs."""
        from tunedex.infra.registry import current_release

        now = time.monotonic()
        if not force and now - self._checked < POLL_S:
            return
        self._checked = now
        try:
            st = (self.registry / "current.json").stat()
        except FileNotFoundError:
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._seen:
            return
        release = current_release(self.registry)
        if release is None or (self.active and self.active.release_id == release.release_id):
            self._seen, self.pending = signature, None
            return
        app = serve.status().applications.get(release.release_id)
        if app is None or app.status != "RUNNING":
            self.pending = release.release_id  # checked again on the next poll; keep serving the old one
            return
        self.active = Active(release=asdict(release), handle=serve.get_app_handle(release.release_id))
        self._seen, self.pending = signature, None

    def current(self, request: Request) -> Active:
        """The release this request is answered by, read once."""
        self.refresh()
        active = self.active
        if active is None:
            raise HTTPException(503, f"no release is being served yet (promoted: {self.pending or 'none'}); "
                                     "run `tunedex serve`")
        request.state.release_id = active.release_id
        return active

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> dict[str, Any]:
        active = self.current(request)
        return {"status": "ready", "release_id": active.release_id, "pending_release_id": self.pending}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.current(request).release)]}

    def _sampling(self, max_tokens: int | None, temperature: float | None, top_p: float | None) -> Sampling:
        return Sampling(max_new_tokens=min(max_tokens or self.max_new_tokens, self.max_new_tokens),
                        temperature=temperature, top_p=top_p)

    async def _openai(self, request: Request, req: ChatRequest | CompletionRequest, kind: str, payload: Any,
                      sampling: Sampling, prompt_chars: int):
        active = self.current(request)
        request.state.mode = kind
        if problem := openai_request_problem(req, active.release_id):
            return problem
        if prompt_chars > self.max_prompt_chars:
            return openai_error(422, f"the prompt holds {prompt_chars} characters, over serve.max_prompt_chars="
                                     f"{self.max_prompt_chars}; shorten it", "prompt_too_long",
                                "messages" if kind == "chat" else "prompt")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        completion_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        try:
            if req.stream:
                pieces = active.handle.options(stream=True).stream.remote(kind, payload, sampling)
                out = await pieces.__anext__()
            else:
                out = await active.handle.complete.remote(kind, payload, sampling)
        except BackPressureError as exc:
            out = overloaded(exc).as_dict()
        except Exception:
            return openai_error(503, "the release is unavailable; try again shortly", "service_unavailable")
        if "error" in out:
            error = out["error"]
            code = "overloaded" if error["status"] in (429, 503) else "invalid_request"
            return openai_error(error["status"], error["message"], code, headers=retry_headers(error))
        if req.stream:
            return StreamingResponse(sse_events(kind, completion_id, out, pieces), media_type="text/event-stream")
        common = {"id": completion_id, "created": int(time.time()), "model": out["release_id"],
                  "sources": out["sources"], "release_id": out["release_id"]}
        if kind == "chat":
            return {**common, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": "stop"}]}
        return {**common, "object": "text_completion",
                "choices": [{"index": 0, "text": out["text"], "logprobs": None, "finish_reason": "stop"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest, request: Request):
        sampling = self._sampling(req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p)
        return await self._openai(request, req, "chat", [m.model_dump() for m in req.messages], sampling,
                                  sum(len(m.content) for m in req.messages))

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest, request: Request):
        prompt = req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if req.prompt else "")
        sampling = self._sampling(req.max_tokens, req.temperature, req.top_p)
        return await self._openai(request, req, "text", prompt, sampling, len(prompt))

    @api.post("/v1/query")
    async def query(self, req: QueryRequest, request: Request) -> dict[str, Any]:
        active = self.current(request)
        request.state.mode = req.mode
        try:
            out = await active.handle.answer.remote(req.question, req.mode, req.top_k, req.filters)
        except BackPressureError as exc:
            out = overloaded(exc).as_dict()
        except Exception:
            raise HTTPException(503, "the release is unavailable; try again shortly") from None
        if "error" in out:
            raise HTTPException(out["error"]["status"], out["error"]["message"], headers=retry_headers(out["error"]))
        return out


def build_release_app(args: ReleaseArgs) -> serve.Application:
    """One release's application (`Release` + `Retriever` + `Generator`), named by its id when deployed."""
    from tunedex.infra.registry import RegistryError, check_model_dir, current_release, load_release

    cfg = load_config(args.config, args.overrides)
    release = load_release(cfg.registry_dir, args.release_id) if args.release_id else current_release(cfg.registry_dir)
    if release is None:
        raise RegistryError(f"no promoted release in {cfg.registry_dir}; run `tunedex promote` first")
    check_model_dir(Path(release.model_path))
    config_args = ServeArgs(config=str(Path(args.config).resolve()), overrides=args.overrides)
    s = cfg.serve
    check_engine_kwargs(s.engine_kwargs)
    gen_args = (s.max_new_tokens, {"max_num_seqs": s.max_batch_size, **s.engine_kwargs})
    gen_defaults = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 2 * s.max_batch_size}
    generator = Generator.options(**deployment_options(cfg, "Generator", **gen_defaults)).bind(release.model_path, *gen_args)
    base = None
    if s.serve_base_model:
        if not release.base_model:
            raise RegistryError(f"release {release.release_id} names no base model; serve.serve_base_model needs one "
                                "(fine-tunes record it in their model card)")
        base = Generator.options(name="BaseGenerator", **deployment_options(cfg, "BaseGenerator", **gen_defaults)
                                 ).bind(release.base_model, *gen_args)
    retriever = Retriever.options(**deployment_options(
        cfg, "Retriever", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)).bind(config_args, release.collection,
                                                                      release.embedding_model, release.consistency_level)
    return Release.options(**deployment_options(
        cfg, "Release", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=256)
    ).bind(asdict(release), retriever, generator, base, s.top_k, s.system_prompt or SYSTEM_PROMPT)


def build_app(args: ServeArgs) -> serve.Application:
    """The HTTP front (`Ingress`), serving whichever release is promoted and deployed."""
    cfg = load_config(args.config, args.overrides)
    args = ServeArgs(config=str(Path(args.config).resolve()), overrides=args.overrides)
    return Ingress.options(**deployment_options(
        cfg, "Ingress", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=256)).bind(args)
