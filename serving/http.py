"""The endpoint's HTTP layer, without Ray: routes, the API key, request limits, OpenAI request and response shapes.

`make_api(backend, settings)` builds the FastAPI app. The routes read the release being served once per request
(`backend.current()`) and call it through `ServedRelease`; `app.py` implements both over Ray Serve handles, a
test with a plain Python class. Every refusal is an OpenAI-style JSON error (`{"error": {message, type, param,
code}}`), bodies included that are not JSON, not UTF-8, nested too deep or of the wrong shape. Responses are
built with the `openai` package's response types; requests are validated by our own strict models (the
package's request params are TypedDicts, which validate nothing), so each bad field gets its own 4xx.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Protocol, TypeVar

from fastapi import FastAPI, Request
from openai.types import Completion as TextCompletion
from openai.types import CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from tunedex.infra.config import ServeConfig
from tunedex.infra.generation import Prompt, Sampling

OPEN_ROUTES = {"/healthz", "/readyz"}  # probes carry no data; every other route needs the key when one is set
MAX_HEADERS = 100  # more header fields than this get 431, whatever their size
IGNORED_OPENAI_PARAMS = {"user", "stream_options", "seed"}


class Problem(Exception):
    """A request that cannot be answered as asked (4xx) or not now (503/429, with its Retry-After).
    Deployments return it (exceptions do not cross Serve handles intact); the HTTP layer raises it."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(status, message, code, param, retry_after_s)  # the args rebuild it when unpickled
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message


@dataclass
class Answer:
    """`/v1/query`'s answer."""

    answer: str
    sources: list[dict[str, Any]]
    release_id: str
    mode: str
    timings_ms: dict[str, float]


@dataclass
class Completion:
    """An OpenAI route's answer (with its token counts and why it ended); a stream's head is one with no text."""

    text: str
    sources: list[dict[str, Any]]
    release_id: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"

    def usage(self) -> dict[str, Any]:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return {}
        return {"usage": CompletionUsage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                                         total_tokens=self.prompt_tokens + self.completion_tokens)}


class ServedRelease(Protocol):
    """One release, as a request sees it from its start to its end."""

    release: dict[str, Any]

    async def answer(self, question: str, mode: str, top_k: int | None, filters: str) -> Answer: ...

    async def complete(self, kind: str, payload: Prompt, sampling: Sampling) -> Completion: ...

    async def stream(self, kind: str, payload: Prompt, sampling: Sampling) -> tuple[Completion, AsyncIterator[str]]:
        """The head (sources, release id) once the first piece is ready, then the text pieces."""


class Backend(Protocol):
    pending: str | None  # promoted but not running yet

    def current(self) -> ServedRelease:
        """The release new requests go to; a 503 `Problem` when there is none."""


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme == "Bearer" and hmac.compare_digest(token.encode(), key.encode())


def without_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("holds a NUL character (\\u0000); remove it")
    return text


Text = Annotated[str, AfterValidator(without_nul)]


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: Text = Field(min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=50)
    filters: Text = Field("", max_length=1000, description="Milvus boolean expression over doc_id/metadata")
    mode: Literal["hybrid", "rag", "finetuned", "retrieve"] = "hybrid"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=20_000)


class ChatRequest(BaseModel):
    """OpenAI's chat request; parameters we do not honour are refused by name, not ignored."""

    model_config = ConfigDict(extra="allow")
    model: Text | None = None
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
    model: Text | None = None
    prompt: Text | list[Text]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = Field(False, strict=True)


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None, detail: bool = False) -> Response:
    """OpenAI's error shape; `detail` adds FastAPI's string too (what `/v1/query` clients have always read).
    ASCII-escaped, so no text a client sent can fail the encoding."""
    kind = {401: "authentication_error"}.get(status, "invalid_request_error" if status < 500 and status != 429
                                             else "server_error")
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    if detail:
        body["detail"] = message
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


def problem_response(problem: Problem, detail: bool = False) -> Response:
    headers = {"Retry-After": str(max(1, round(problem.retry_after_s)))} if problem.retry_after_s else None
    return error_response(problem.status, problem.message, problem.code, problem.param, headers, detail)


M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, model: type[M]) -> M:
    """The body as `model`, or a 4xx `Problem` that says what is wrong with it."""
    mime = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if mime and mime != "application/json" and not mime.endswith("+json"):
        raise Problem(415, f"send the body as JSON with `Content-Type: application/json` (got {mime!r})",
                      "unsupported_media_type")
    try:
        raw = await request.body()
    except ClientDisconnect:  # also what BodyLimit reports once it has answered 413
        raise Problem(400, "the request body did not arrive") from None
    if not raw.strip():
        raise Problem(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise body_problem(exc) from None


def body_problem(exc: ValidationError) -> Problem:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if errors[0]["type"] == "json_invalid":  # not JSON: bad syntax, not UTF-8, a lone surrogate, nested too deep
        return Problem(400, f"the request body is not valid JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}",
                       "invalid_json")
    where = [".".join(map(str, e["loc"])) or "body" for e in errors]
    message = "; ".join(f"{loc}: {e['msg']}" for loc, e in zip(where, errors))
    return Problem(422, message, "invalid_request", where[0])


def model_card(release: dict[str, Any]) -> dict[str, Any]:
    created = int(datetime.fromisoformat(release["created_at"]).timestamp())
    return Model(id=release["release_id"], object="model", created=created, owned_by="tunedex").model_dump(exclude_unset=True)


def completion_object(kind: str, completion_id: str, model: str, text: str | None, chunk: bool,
                      finish: str | None = "stop", **extra: Any) -> dict[str, Any]:
    """An OpenAI chat or text completion, or one chunk of its stream (`text=None`: the opening chunk), built
    with the `openai` package's own response types, so the shape is the one its client parses; extra fields
    (`sources`, `release_id`) ride along, as those types allow."""
    head = {"id": completion_id, "created": int(time.time()), "model": model, **extra}
    if kind == "text":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        # a streamed text chunk's finish_reason is null until the last one, which the type cannot say
        choices = [CompletionChoice(**choice) if finish else CompletionChoice.model_construct(**choice)]
        out: Any = TextCompletion(object="text_completion", choices=choices, **head)
    elif chunk:
        delta = ChoiceDelta(role="assistant", content="") if text is None else (
            ChoiceDelta(content=text) if text else ChoiceDelta())
        out = ChatCompletionChunk(object="chat.completion.chunk", choices=[
            ChunkChoice(index=0, delta=delta, finish_reason=finish)], **head)
    else:
        out = ChatCompletion(object="chat.completion", choices=[ChatChoice(
            index=0, message=ChatCompletionMessage(role="assistant", content=text), finish_reason=finish)], **head)
    return out.model_dump(exclude_unset=True)


async def sse_events(kind: str, completion_id: str, head: Completion, pieces: AsyncIterator[str]):
    """The stream's events: sources and release id on the first, then the text, then [DONE]."""
    def event(text: str | None, finish: str | None = None, **extra: Any) -> str:
        chunk = completion_object(kind, completion_id, head.release_id, text, True, finish, **extra)
        return f"data: {json.dumps(chunk)}\n\n"

    yield event(None, sources=head.sources, release_id=head.release_id)
    async for piece in pieces:
        yield event(piece)
    yield event("", "stop")
    yield "data: [DONE]\n\n"


def openai_problem(req: ChatRequest | CompletionRequest, release_id: str, prompt_chars: int,
                   max_prompt_chars: int) -> Problem | None:
    unsupported = sorted(set(req.model_extra or {}) - IGNORED_OPENAI_PARAMS)
    if unsupported:
        return Problem(400, f"parameter(s) {', '.join(unsupported)} are not supported by this endpoint",
                       "unsupported_parameter", unsupported[0])
    if req.model not in (None, "tunedex", release_id):
        return Problem(404, f"model {req.model!r} is not served here; use {release_id!r} (see /v1/models)",
                       "model_not_found", "model")
    if isinstance(req, ChatRequest) and not any(m.role == "user" for m in req.messages):
        return Problem(400, "messages need at least one user message", "invalid_messages", "messages")
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list) and len(req.prompt) != 1:
        return Problem(400, "send one prompt per request (a list of prompts is not supported)", "invalid_prompt",
                       "prompt")
    if prompt_chars > max_prompt_chars:
        return Problem(422, f"the prompt holds {prompt_chars} characters, over serve.max_prompt_chars="
                            f"{max_prompt_chars}; shorten it", "prompt_too_long",
                       "messages" if isinstance(req, ChatRequest) else "prompt")
    return None


class BodyLimit:
    """431 for headers over `max_header_bytes` or MAX_HEADERS fields; 413 for a body over `max_body_bytes`,
    by its Content-Length before reading or as it streams in."""

    def __init__(self, app: Any, max_body_bytes: int, max_header_bytes: int):
        self.app, self.limit, self.header_limit = app, max_body_bytes, max_header_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, headers = self.limit, scope.get("headers") or []
        header_bytes = sum(len(k) + len(v) for k, v in headers)
        if len(headers) > MAX_HEADERS or header_bytes > self.header_limit:
            return await error_response(431, f"request headers are too large ({len(headers)} fields, {header_bytes} "
                                             f"bytes; at most {MAX_HEADERS} fields and serve.max_header_bytes="
                                             f"{self.header_limit})", "headers_too_large")(scope, receive, send)
        declared = dict(headers).get(b"content-length", b"")
        too_large = error_response(413, f"request body is over {limit} bytes (serve.max_body_bytes)", "body_too_large")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        received, answered = 0, False

        async def counted() -> dict:
            # Over the limit: answer 413 now and tell the app the client left.
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


# (route, status, release id, mode, milliseconds to the response head)
RecordRequest = Callable[[str, int, str, str, float], None]


class RequireKey:
    """401 without `Authorization: Bearer <key>`, except on OPEN_ROUTES. Middleware here are plain ASGI (as
    Starlette advises): `@app.middleware` wraps each request and every streamed chunk in tasks and memory
    streams, 0.6 ms of CPU per request for two of them on this machine."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and Request(scope).url.path not in OPEN_ROUTES:
            if not authorized(Headers(scope=scope).get("authorization"), self.key):
                return await error_response(401, "missing or wrong API key; send `Authorization: Bearer "
                                                 "<serve.api_key>`", "invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


class Recorded:
    """Tells `record` of every HTTP request as its response head goes out (for a stream: before its text)."""

    def __init__(self, app: Any, record: RecordRequest):
        self.app, self.record = app, record

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def send_recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                request = Request(scope)  # the route and `state` the app set on the shared scope
                self.record(route_label(request), message["status"], getattr(request.state, "release_id", ""),
                            getattr(request.state, "mode", ""), (time.perf_counter() - started) * 1000)
            await send(message)

        await self.app(scope, receive, send_recorded)


def route_label(request: Request) -> str:
    """The route's template (a bounded label set), also for requests refused before routing (401, 413)."""
    from starlette.routing import Match

    if path := getattr(request.scope.get("route"), "path", None):
        return path
    for candidate in request.app.routes:
        if getattr(candidate, "path", None) and candidate.matches(request.scope)[0] != Match.NONE:
            return candidate.path
    return "unmatched"


def make_api(backend: Backend, settings: ServeConfig, record: RecordRequest | None = None) -> FastAPI:
    """The endpoint's FastAPI app over `backend`; `record` is told of every request, refused ones included."""
    api = FastAPI(title="tunedex", docs_url=None, redoc_url=None)
    key = settings.api_key

    @api.exception_handler(Problem)
    async def refused(request: Request, problem: Problem) -> Response:
        return problem_response(problem, detail=request.url.path == "/v1/query")

    @api.exception_handler(HTTPException)
    async def http_refused(request: Request, exc: HTTPException) -> Response:  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return error_response(exc.status_code, str(exc.detail), code, headers=exc.headers, detail=True)

    @api.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:  # logged by Starlette as well
        return error_response(500, "the server failed on this request; try again or report it", "server_error")

    # the last added runs first: every request is recorded, also one refused for its key or its size
    api.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes, max_header_bytes=settings.max_header_bytes)
    if key:
        api.add_middleware(RequireKey, key=key)
    if record is not None:
        api.add_middleware(Recorded, record=record)

    def current(request: Request, mode: str = "") -> ServedRelease:
        served = backend.current()
        request.state.release_id, request.state.mode = served.release["release_id"], mode
        return served

    def sampling(max_tokens: int | None, req: ChatRequest | CompletionRequest) -> Sampling:
        cap = settings.max_new_tokens  # a larger max_tokens is capped, not refused (documented)
        return Sampling(max_new_tokens=min(max_tokens or cap, cap), temperature=req.temperature, top_p=req.top_p)

    async def openai_route(request: Request, req: ChatRequest | CompletionRequest, kind: str, payload: Prompt,
                           max_tokens: int | None, prompt_chars: int):
        served = current(request, kind)
        if problem := openai_problem(req, served.release["release_id"], prompt_chars, settings.max_prompt_chars):
            raise problem
        completion_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            head, pieces = await served.stream(kind, payload, sampling(max_tokens, req))
            return StreamingResponse(sse_events(kind, completion_id, head, pieces), media_type="text/event-stream")
        out = await served.complete(kind, payload, sampling(max_tokens, req))
        return completion_object(kind, completion_id, out.release_id, out.text, False, out.finish_reason,
                                 sources=out.sources, release_id=out.release_id, **out.usage())

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(request: Request) -> dict[str, Any]:
        return {"status": "ready", "release_id": current(request).release["release_id"],
                "pending_release_id": backend.pending}

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(current(request).release)]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        messages = [m.model_dump() for m in req.messages]
        return await openai_route(request, req, "chat", messages, req.max_completion_tokens or req.max_tokens,
                                  sum(len(m["content"]) for m in messages))

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        prompt = req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if req.prompt else "")
        return await openai_route(request, req, "text", prompt, req.max_tokens, len(prompt))

    @api.post("/v1/query")
    async def query(request: Request) -> dict[str, Any]:
        req = await read_body(request, QueryRequest)
        out = await current(request, req.mode).answer(req.question, req.mode, req.top_k, req.filters)
        return asdict(out)

    return api
