"""The hybrid endpoint on Ray Serve: retrieve from the release's collection, generate with its model, cite sources.

Two kinds of Ray Serve application:
- one application per loaded release, named by its release id (`build_release_app`): `Retriever`
  (embedder + Milvus hybrid search on the release's collection), `Generator` (the release's model on
  vLLM, `engine.py`), `BaseGenerator` (the base model, only with `serve.serve_base_model`) and `Release`,
  which answers a question end to end with that release only;
- `tunedex` (`build_app`): the `Ingress`, serving the HTTP routes of `http.py` over the promoted release.

Release swap (`serving/control.py`): the new release's application is deployed beside the serving one
and becomes ready (model loaded), then the registry's `current.json` is switched. Each Ingress replica
re-reads that pointer (at most every `POLL_S`) and moves its one `active` reference; every request reads
that reference once, at its start, so in-flight requests finish on the release they started on.
"""


import asyncio
import functools
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from tunedex.infra.config import TunedexConfig, load_config
from tunedex.infra.generation import Prompt, Sampling
from tunedex.infra.ids import content_hash
from tunedex.infra.prompt import (SYSTEM_PROMPT, GuardedStream, build_chat_messages, build_messages, guard_answer,
                                  source_entries, text_prompt)
from tunedex.serving.engine import EngineError, Generator, check_engine_kwargs, lora_kwargs
from tunedex.serving.http import Answer, Completion, Problem, make_api

POLL_S = 0.25  # how often an Ingress replica re-reads the registry's pointer to the promoted release


class ServeArgs(BaseModel):
    """Arguments of `build_app`; Serve validates them at deploy time."""

    config: str = "configs/local.yaml"
    overrides: list[str] = Field(default_factory=list)


METRICS: dict[str, Any] = {}


def record_request(route: str, status: int, release_id: str, mode: str, ms: float) -> None:
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
    tags = {"route": route, "status": str(status), "release_id": release_id, "mode": mode}
    METRICS["requests"].inc(tags=tags)
    if status >= 400:
        METRICS["errors"].inc(tags=tags)
    METRICS["latency"].observe(ms, tags=tags)


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
        # first use in one thread, before any query: a fresh replica froze on its first concurrent queries under
        # load (CI S8, twice), its health checks unanswered; whichever library's first-use set-up it was, it runs here
        store.hybrid_search(self.client, self.milvus, collection, self.embedder.embed(["warm-up"])[0], "warm-up", 1, "")

    async def retrieve(self, question: str, top_k: int, filters: str) -> list[Any] | Problem:
        """The hits, or the `Problem` with a bad filter (returned: exceptions do not cross handles intact)."""
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
            return Problem(422, f"filters {filters!r} is not a valid Milvus expression: {first}", param="filters")


def refused(exc: BackPressureError | EngineError) -> Problem:
    """Serve's backpressure (the model's queue is full: 503/429 with Retry-After) or the engine refusing the
    request's values (400)."""
    if isinstance(exc, EngineError):
        return Problem(400, f"the engine refused the request: {getattr(exc, 'cause', exc)}", "invalid_request")
    return Problem(exc.status_code, f"the model is at capacity ({exc.message}); retry shortly", "overloaded",
                   retry_after_s=exc.retry_after_s)


# An engine a `Release` calls: bound inside its application, or (deployment, application) of a shared one.
Engine = DeploymentHandle | tuple[str, str]


def engine_handle(engine: Engine) -> DeploymentHandle:
    return serve.get_deployment_handle(*engine) if isinstance(engine, tuple) else engine


@serve.deployment(name="Release")
class Release:
    """One release end to end: retrieval from its collection, generation with its model, its sources.
    Its methods return a `Problem` for a request it cannot answer (exceptions do not cross handles intact)."""

    def __init__(self, release: dict, retriever: DeploymentHandle, generator: Engine, base_generator: Engine | None,
                 top_k: int, system_prompt: str):
        from ray.serve import metrics

        self.release = release
        self.release_id = release["release_id"]
        self.retriever = retriever
        self.generator = engine_handle(generator)
        self.base_generator = engine_handle(base_generator) if base_generator is not None else None
        self.adapter = release["model_path"] if release.get("adapter") else ""  # LoRA: served on the base's engine
        self.shared = sorted({e[1] for e in (generator, base_generator) if isinstance(e, tuple)})
        self.top_k = top_k
        self.system_prompt = system_prompt
        # Serve tags it with the application, i.e. the release id
        self.aborted = metrics.Counter("tunedex_generation_aborted",
                                       description="streamed generations aborted in the engine as their caller left")

    async def info(self) -> dict[str, Any]:
        return self.release

    async def engine_apps(self) -> list[str]:
        """The shared engines' applications this release calls (what retiring it may leave unused)."""
        return self.shared

    async def _retrieve(self, question: str, top_k: int | None, filters: str) -> list[Any]:
        hits = await self.retriever.retrieve.remote(question, top_k or self.top_k, filters)
        if isinstance(hits, Problem):
            raise hits
        return hits

    def _model(self, mode: str) -> tuple[DeploymentHandle, str]:
        """The engine and adapter a mode generates with: the release's model, or (`rag`) its base."""
        if mode != "rag":
            return self.generator, self.adapter
        if self.base_generator is None:
            raise Problem(400, "mode 'rag' needs the release's base model loaded; set serve.serve_base_model: "
                               "true (and promote a model whose card names its base) or use mode 'hybrid'", param="mode")
        return self.base_generator, ""

    async def answer(self, question: str, mode: str, top_k: int | None, filters: str) -> Answer | Problem:
        """`/v1/query`: hybrid = fine-tuned + retrieval, rag = base + retrieval, finetuned = no retrieval."""
        started = time.perf_counter()
        try:
            model, adapter = self._model(mode) if mode != "retrieve" else (None, "")
            hits = await self._retrieve(question, top_k, filters) if mode != "finetuned" else []
            timings = {"retrieve": round((time.perf_counter() - started) * 1000, 2)}
            answer = ""
            if model is not None:
                contexts = [h.text for h in hits] if mode in ("hybrid", "rag") else []
                gen_started = time.perf_counter()
                prompt = build_messages(question, contexts, system_prompt=self.system_prompt)
                generated = await model.generate.remote(prompt, Sampling(), adapter)
                answer = guard_answer(generated.text, self.system_prompt, contexts)
                timings["generate"] = round((time.perf_counter() - gen_started) * 1000, 2)
        except Problem as problem:
            return problem
        except (BackPressureError, EngineError) as exc:
            return refused(exc)
        timings["total"] = round((time.perf_counter() - started) * 1000, 2)
        return Answer(answer, source_entries(hits), self.release_id, mode, timings)

    async def _prompt(self, kind: str, payload: Prompt) -> tuple[Prompt, list[str], list[dict]]:
        question = next(m["content"] for m in reversed(payload) if m["role"] == "user") if kind == "chat" else payload
        hits = await self._retrieve(question, None, "")
        contexts = [h.text for h in hits]
        if kind == "chat":
            return build_chat_messages(payload, contexts, system_prompt=self.system_prompt), contexts, source_entries(hits)
        return text_prompt(payload, contexts), contexts, source_entries(hits)

    async def complete(self, kind: str, payload: Prompt, sampling: Sampling) -> Completion | Problem:
        """OpenAI routes: `chat` (messages) or `text` (a raw prompt), retrieval on the question."""
        try:
            prompt, contexts, sources = await self._prompt(kind, payload)
            generated = await self.generator.generate.remote(prompt, sampling, self.adapter)
        except Problem as problem:
            return problem
        except (BackPressureError, EngineError) as exc:
            return refused(exc)
        return Completion(guard_answer(generated.text, self.system_prompt, contexts), sources, self.release_id,
                          generated.prompt_tokens, generated.completion_tokens, generated.finish_reason)

    async def stream(self, kind: str, payload: Prompt, sampling: Sampling):
        """First a `Completion` with the sources and no text (or a `Problem`), then the text pieces, through the
        output guard. The head waits for the first piece, so a full model queue is still an error status."""
        try:
            prompt, contexts, sources = await self._prompt(kind, payload)
            pieces = self.generator.options(stream=True).stream.remote(prompt, sampling, self.adapter)
            first = await anext(pieces, "")
        except Problem as problem:
            yield problem
            return
        except (BackPressureError, EngineError) as exc:
            yield refused(exc)
            return
        yield Completion("", sources, self.release_id)
        guard, finished = GuardedStream(self.system_prompt, contexts), False
        try:
            if released := guard.feed(first):
                yield released
            async for piece in pieces:
                if released := guard.feed(piece):
                    yield released
            if rest := guard.close():
                yield rest
            finished = True
        finally:
            if not finished:  # the client left: cancelling `pieces` aborts the request in the engine
                self.aborted.inc()


class ReleaseArgs(ServeArgs):
    """Arguments of `build_release_app`; no `release_id` = the promoted one. `shared_engines`: call the engines
    deployed as their own applications (`build_engine_app`, what `tunedex promote` does) instead of loading them
    inside this application (a release declared in a Serve config file)."""

    release_id: str | None = None
    shared_engines: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM engine a release generates with: the model it loads and how. Its application's name is derived
    from all of it, so releases on the same model (a new index, LoRA adapters on one base) share one engine."""

    deployment: str  # "Generator" or "BaseGenerator": which `serve.deployments` options apply
    model_path: str
    max_new_tokens: int
    engine_kwargs: dict[str, Any]
    options: dict[str, Any]

    @property
    def app(self) -> str:
        return "engine-" + content_hash(json.dumps(asdict(self), sort_keys=True, default=str))[:12]


def engines(cfg: TunedexConfig, release: Any) -> dict[str, EngineSpec]:
    """The engines `release` is served by: `generator` (its model) and, for `mode: rag`, `base`. A LoRA release
    runs on its base's engine (with `enable_lora`), which serves the base too."""
    from tunedex.infra.registry import RegistryError

    s = cfg.serve
    check_engine_kwargs(s.engine_kwargs)
    defaults = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 2 * s.max_batch_size}

    def spec(deployment: str, model: str, extra: dict[str, Any]) -> EngineSpec:
        kwargs = {"max_num_seqs": s.max_batch_size, **extra, **s.engine_kwargs}
        return EngineSpec(deployment, model, s.max_new_tokens, kwargs, deployment_options(cfg, deployment, **defaults))

    if release.adapter:
        generator = spec("Generator", release.base_model, lora_kwargs(Path(release.model_path)))
        return {"generator": generator, "base": generator}
    found = {"generator": spec("Generator", release.model_path, {})}
    if s.serve_base_model:
        if not release.base_model:
            raise RegistryError(f"release {release.release_id} names no base model; serve.serve_base_model needs one "
                                "(fine-tunes record it in their model card)")
        found["base"] = spec("BaseGenerator", release.base_model, {})
    return found


def build_engine_app(spec: EngineSpec) -> serve.Application:
    """An engine as its own application, named `spec.app`, called by every release that needs it."""
    return Generator.options(name=spec.deployment, **spec.options).bind(spec.model_path, spec.max_new_tokens,
                                                                         spec.engine_kwargs)


async def answered(call: Any) -> Any:
    """A `Release` call's result; its `Problem` raised, Serve's backpressure and a failed replica as ones too."""
    try:
        out = await call
    except (BackPressureError, EngineError) as exc:
        raise refused(exc) from None
    except Exception:
        raise Problem(503, "the release is unavailable; try again shortly", "service_unavailable") from None
    if isinstance(out, Problem):
        raise out
    return out


@dataclass
class ServedOverServe:
    """A release as `http.py` sees it (`ServedRelease`), over its application's `Release` handle."""

    release: dict[str, Any]
    handle: DeploymentHandle

    @property
    def release_id(self) -> str:
        return self.release["release_id"]

    async def answer(self, question: str, mode: str, top_k: int | None, filters: str) -> Answer:
        return await answered(self.handle.answer.remote(question, mode, top_k, filters))

    async def complete(self, kind: str, payload: Prompt, sampling: Sampling) -> Completion:
        return await answered(self.handle.complete.remote(kind, payload, sampling))

    async def stream(self, kind: str, payload: Prompt, sampling: Sampling) -> tuple[Completion, AsyncIterator[str]]:
        pieces = self.handle.options(stream=True).stream.remote(kind, payload, sampling)
        return await answered(pieces.__anext__()), pieces


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP routes (`http.make_api`) over whichever release the registry names, once its application runs."""

    def __init__(self, args: ServeArgs):
        cfg = load_config(args.config, args.overrides)
        self.settings, self.registry = cfg.serve, cfg.registry_dir
        self.active: ServedOverServe | None = None
        self.pending: str | None = None  # promoted in the registry but its application is not running
        self._seen: tuple | None = None
        self._checked = 0.0
        self.refresh(force=True)

    def __serve_build_asgi_app__(self):
        return make_api(self, self.settings, record_request)

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
        self.active = ServedOverServe(asdict(release), serve.get_app_handle(release.release_id))
        self._seen, self.pending = signature, None

    def current(self) -> ServedOverServe:
        """The release a request is answered by; the caller reads it once, at the request's start."""
        self.refresh()
        if self.active is None:
            raise Problem(503, f"no release is being served yet (promoted: {self.pending or 'none'}); "
                               "run `tunedex serve`", "service_unavailable")
        return self.active


def build_release_app(args: ReleaseArgs) -> serve.Application:
    """One release's application (`Release` + `Retriever`, and its engines unless shared), named by its id."""
    from tunedex.infra.registry import RegistryError, check_model_dir, current_release, load_release

    cfg = load_config(args.config, args.overrides)
    release = load_release(cfg.registry_dir, args.release_id) if args.release_id else current_release(cfg.registry_dir)
    if release is None:
        raise RegistryError(f"no promoted release in {cfg.registry_dir}; run `tunedex promote` first")
    check_model_dir(Path(release.model_path))
    config_args = ServeArgs(config=str(Path(args.config).resolve()), overrides=args.overrides)
    specs = engines(cfg, release)
    if args.shared_engines:
        bound = {role: (spec.deployment, spec.app) for role, spec in specs.items()}
    else:
        own = {spec.app: build_engine_app(spec) for spec in specs.values()}
        bound = {role: own[spec.app] for role, spec in specs.items()}
    retriever = Retriever.options(**deployment_options(
        cfg, "Retriever", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)).bind(config_args, release.collection,
                                                                      release.embedding_model, release.consistency_level)
    return Release.options(**deployment_options(
        cfg, "Release", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=256)
    ).bind(asdict(release), retriever, bound["generator"], bound.get("base"), cfg.serve.top_k,
           cfg.serve.system_prompt or SYSTEM_PROMPT)


def build_app(args: ServeArgs) -> serve.Application:
    """The HTTP front (`Ingress`), serving whichever release is promoted and deployed."""
    cfg = load_config(args.config, args.overrides)
    args = ServeArgs(config=str(Path(args.config).resolve()), overrides=args.overrides)
    return Ingress.options(**deployment_options(
        cfg, "Ingress", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=256)).bind(args)
