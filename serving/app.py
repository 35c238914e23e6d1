"""The hybrid endpoint: retrieve from the release's collection, generate with its model, cite sources.

A normal Ray Serve application: `serve run tunedex.serving.app:build_app config=configs/local.yaml`.
Deployments: `Retriever` (embedder + Milvus hybrid search), `Generator` (the release's model),
`Ingress` (FastAPI routes).
"""


import asyncio
import hmac
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from tunedex.infra.config import load_config
from tunedex.serving.prompt import build_messages, source_entries

api = FastAPI(title="tunedex", docs_url=None, redoc_url=None)
OPEN_ROUTES = {"/healthz", "/readyz"}  # probes carry no data; every other route needs the key when one is set


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme == "Bearer" and hmac.compare_digest(token.encode(), key.encode())


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

    def _generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        limit = getattr(self.model.config, "n_positions", None) or getattr(self.model.config, "max_position_embeddings")
        room = max(1, min(max_new_tokens, limit // 4))
        input_ids = enc["input_ids"][:, -(limit - room):]  # keep the end: the question and the assistant turn
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=room,
                do_sample=False, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()

    async def generate(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> str:
        return await asyncio.to_thread(self._generate, messages, max_new_tokens or self.max_new_tokens)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    def __init__(
        self, retriever: DeploymentHandle, generator: DeploymentHandle, release: dict, top_k: int, api_key: str | None
    ):
        api.state.api_key = api_key
        self.retriever = retriever
        self.generator = generator
        self.release = release
        self.top_k = top_k

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        return {"status": "ready", "release_id": self.release["release_id"]}

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
            answer = await self.generator.generate.remote(build_messages(req.question, contexts))
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
    return Ingress.bind(retriever, generator, asdict(release), cfg.serve.top_k, cfg.serve.api_key)
