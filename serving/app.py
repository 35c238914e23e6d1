"""The hybrid endpoint: retrieve from the release's collection, generate with its model, cite sources.

A normal Ray Serve application: `serve run tunedex.serving.app:build_app config=configs/local.yaml`.
Deployments: `Retriever` (embedder + Milvus hybrid search), `Generator` (the release's model),
`Ingress` (FastAPI routes).
"""


import asyncio
import hmac
import json
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
from ray.serve.handle import DeploymentHandle

from tunedex.infra.config import load_config
from tunedex.serving.prompt import build_chat_messages, build_messages, source_entries

api = FastAPI(title="tunedex", docs_url=None, redoc_url=None)
OPEN_ROUTES = {"/healthz", "/readyz"}  # probes carry no data; every other route needs the key when one is set


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme == "Bearer" and hmac.compare_digest(token.encode(), key.encode())


class BodyLimit:
    """413 for a body over `serve.max_body_bytes`: by its Content-Length before reading, or as it streams in."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        app = scope.get("app")  # Starlette puts itself here before running its middleware
        limit = getattr(app.state, "max_body_bytes", None) if scope["type"] == "http" and app is not None else None
        if not limit:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        too_large = JSONResponse({"error": {"message": f"request body is over {limit} bytes (serve.max_body_bytes)",
                                            "type": "invalid_request_error", "code": "body_too_large"}},
                                 status_code=413)
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
    stream: bool = False


IGNORED_OPENAI_PARAMS = {"user", "stream_options", "seed"}


def openai_error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                   "param": param, "code": code}}, status_code=status)


def openai_request_problem(req: ChatRequest, release: dict) -> JSONResponse | None:
    unsupported = sorted(set(req.model_extra or {}) - IGNORED_OPENAI_PARAMS)
    if unsupported:
        return openai_error(400, f"parameter(s) {', '.join(unsupported)} are not supported by this endpoint",
                            "unsupported_parameter", unsupported[0])
    if req.model not in (None, "tunedex", release["release_id"]):
        return openai_error(404, f"model {req.model!r} is not served here; use {release['release_id']!r} (see /v1/models)",
                            "model_not_found", "model")
    if not any(m.role == "user" for m in req.messages):
        return openai_error(400, "messages need at least one user message", "invalid_messages", "messages")
    return None


def model_card(release: dict) -> dict[str, Any]:
    created = int(datetime.fromisoformat(release["created_at"]).timestamp())
    return {"id": release["release_id"], "object": "model", "created": created, "owned_by": "tunedex"}


async def sse_chunks(completion_id: str, release: dict, sources: list[dict], pieces: Any):
    """OpenAI chat.completion.chunk events; the first carries the sources, the stream ends with [DONE]."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": release["release_id"]}

    def event(delta: dict, finish: str | None = None, **extra: Any) -> str:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""}, sources=sources, release_id=release["release_id"])
    async for piece in pieces:
        yield event({"content": piece})
    yield event({}, "stop")
    yield "data: [DONE]\n\n"


@serve.deployment(name="Retriever", ray_actor_options={"num_cpus": 0.5})
class Retriever:
    def __init__(self, args: ServeArgs, collection: str):
        from tunedex.infra import store
        from tunedex.infra.embedding import load_embedder

        cfg = load_config(args.config, args.overrides)
        self.milvus = cfg.milvus
        self.collection = collection
        self.embedder = load_embedder(cfg.embedding)
        self.client = store.connect(cfg.milvus)
        self.client.load_collection(collection)

    async def retrieve(self, question: str, top_k: int, filters: str) -> list[Any]:
        from tunedex.infra import store

        vector = (await asyncio.to_thread(self.embedder.embed, [question]))[0]
        return await asyncio.to_thread(
            store.hybrid_search, self.client, self.milvus, self.collection, vector, question, top_k, filters
        )


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, model_path: str, max_new_tokens: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True, trust_remote_code=False)
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    def _generate_kwargs(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> dict[str, Any]:
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        limit = getattr(self.model.config, "n_positions", None) or getattr(self.model.config, "max_position_embeddings")
        room = max(1, min(sampling.get("max_new_tokens") or self.max_new_tokens, limit // 4))
        input_ids = enc["input_ids"][:, -(limit - room):]  # keep the end: the question and the assistant turn
        temperature = sampling.get("temperature") or 0.0
        extra = {"do_sample": True, "temperature": temperature, "top_p": sampling.get("top_p") or 1.0} \
            if temperature > 0 else {"do_sample": False}
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "max_new_tokens": room,
                "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id, **extra}

    def _generate(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> str:
        import torch

        kwargs = self._generate_kwargs(messages, sampling)
        with torch.no_grad():
            out = self.model.generate(**kwargs)
        return self.tokenizer.decode(out[0, kwargs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    async def generate(self, messages: list[dict[str, str]], sampling: dict[str, Any] | None = None) -> str:
        return await asyncio.to_thread(self._generate, messages, sampling or {})

    async def stream(self, messages: list[dict[str, str]], sampling: dict[str, Any] | None = None):
        """Text pieces as the model produces them (call through a handle with `stream=True`)."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(messages, sampling or {})

        def run() -> None:
            with torch.no_grad():
                self.model.generate(**kwargs, streamer=streamer)

        threading.Thread(target=run, daemon=True).start()
        pieces = iter(streamer)
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            if piece:
                yield piece


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    def __init__(
        self, retriever: DeploymentHandle, generator: DeploymentHandle, release: dict, top_k: int,
        api_key: str | None, max_new_tokens: int, limits: dict[str, int],
    ):
        api.state.api_key = api_key
        api.state.max_body_bytes = limits["max_body_bytes"]
        self.max_prompt_chars = limits["max_prompt_chars"]
        self.retriever = retriever
        self.generator = generator
        self.release = release
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        return {"status": "ready", "release_id": self.release["release_id"]}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.release)]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest):
        if problem := openai_request_problem(req, self.release):
            return problem
        prompt_chars = sum(len(m.content) for m in req.messages)
        if prompt_chars > self.max_prompt_chars:
            return openai_error(422, f"the messages hold {prompt_chars} characters, over serve.max_prompt_chars="
                                     f"{self.max_prompt_chars}; shorten the conversation", "prompt_too_long", "messages")
        question = next(m.content for m in reversed(req.messages) if m.role == "user")
        try:
            hits = await self.retriever.retrieve.remote(question, self.top_k, "")
        except Exception:
            return openai_error(503, "retrieval is unavailable; try again shortly", "service_unavailable")
        messages = build_chat_messages([m.model_dump() for m in req.messages], [h.text for h in hits])
        sampling = {"max_new_tokens": min(req.max_completion_tokens or req.max_tokens or self.max_new_tokens,
                                          self.max_new_tokens),
                    "temperature": req.temperature, "top_p": req.top_p}
        sources = source_entries(hits)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            pieces = self.generator.options(stream=True).stream.remote(messages, sampling)
            return StreamingResponse(sse_chunks(completion_id, self.release, sources, pieces),
                                     media_type="text/event-stream")
        answer = await self.generator.generate.remote(messages, sampling)
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.release["release_id"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "sources": sources, "release_id": self.release["release_id"]}

    @api.post("/v1/query")
    async def query(self, req: QueryRequest) -> dict[str, Any]:
        started = time.perf_counter()
        hits: list[Any] = []
        timings: dict[str, float] = {}
        if req.mode != "finetuned":
            try:
                hits = await self.retriever.retrieve.remote(req.question, req.top_k or self.top_k, req.filters)
            except Exception as exc:
                if "filter" in str(exc).lower() or "expr" in str(exc).lower():
                    raise HTTPException(422, f"filters {req.filters!r} is not a valid Milvus expression") from None
                raise HTTPException(503, "retrieval is unavailable; try again shortly") from None
        timings["retrieve"] = round((time.perf_counter() - started) * 1000, 2)
        answer = ""
        if req.mode != "retrieve":
            contexts = [h.text for h in hits] if req.mode in ("hybrid", "rag") else []
            gen_started = time.perf_counter()
            answer = await self.generator.generate.remote(build_messages(req.question, contexts), {})
            timings["generate"] = round((time.perf_counter() - gen_started) * 1000, 2)
        timings["total"] = round((time.perf_counter() - started) * 1000, 2)
        return {"answer": answer, "sources": source_entries(hits), "release_id": self.release["release_id"],
                "mode": req.mode, "timings_ms": timings}


def build_app(args: ServeArgs) -> serve.Application:
    """Compose the app for the current promoted release."""
    from tunedex.infra.registry import RegistryError, check_model_dir, current_release

    cfg = load_config(args.config, args.overrides)
    args = ServeArgs(config=str(Path(args.config).resolve()), overrides=args.overrides)
    release = current_release(cfg.registry_dir)
    if release is None:
        raise RegistryError(f"no promoted release in {cfg.registry_dir}; run `tunedex promote` first")
    check_model_dir(Path(release.model_path))
    retriever = Retriever.bind(args, release.collection)
    generator = Generator.bind(release.model_path, cfg.serve.max_new_tokens)
    limits = {"max_body_bytes": cfg.serve.max_body_bytes, "max_prompt_chars": cfg.serve.max_prompt_chars}
    return Ingress.bind(retriever, generator, asdict(release), cfg.serve.top_k, cfg.serve.api_key,
                        cfg.serve.max_new_tokens, limits)
