"""The one config schema every tunedex entry point reads.

Every field has a default that runs on a laptop. Moving to a cluster changes values
(`milvus.uri`, `ray.address`, `prefect.api_url`), never code. A bad file fails at load
with every problem listed at once, each naming its key and the fix.
"""

from __future__ import annotations

import difflib
import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunedex.infra.errors import TunedexError


class ConfigError(TunedexError, ValueError):
    """A config that cannot be used; the message lists every problem with its fix."""

    exit_code = 2


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_INDEX_DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 64}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 32}),
    "FLAT": ({}, {}),
    "AUTOINDEX": ({}, {}),
}


class MilvusConfig(Section):
    uri: str = Field("http://127.0.0.1:19530", description="Milvus endpoint; a server is http://milvus:19530")
    token: str = Field("", description="Milvus token (user:password) for a secured server")
    local_server: bool = Field(True, description="`tunedex up` starts a Milvus Lite server for a loopback uri")
    local_engine: Literal["milvus-lite-2.5", "milvus-lite-3"] = Field(
        "milvus-lite-2.5",
        description="server `tunedex up` starts: the C++ milvus-lite 2.5 (.venv-milvus; FLAT/IVF_FLAT, no aliases) "
        "or the pure-Python Milvus Lite 3 (bench/retrieval_latency.py compares them)",
    )
    collection: str = Field("tunedex_docs", description="collection name prefix; the model id is appended")
    consistency_level: Literal["Strong", "Session", "Bounded", "Eventually"] = "Strong"
    index_type: Literal["HNSW", "FLAT", "IVF_FLAT", "AUTOINDEX"] = "IVF_FLAT"
    index_params: dict[str, Any] | None = Field(None, description="dense index build params; default per index_type")
    search_params: dict[str, Any] | None = Field(None, description="dense search params; default per index_type")
    write_batch_size: int = Field(256, ge=1, le=10_000)
    keep_collections: int = Field(2, ge=1, description="collections of past embedding models kept, the live one included")
    text_analyzer: Literal["english", "standard", "chinese"] | None = Field(
        None, description="Milvus analyzer of the BM25 text field, fixed when a collection is created; default english "
                          "(stemming, stop words), standard on milvus.local_engine milvus-lite-3 (it has no other)")
    ranker: Literal["rrf", "weighted"] = Field("rrf", description="how dense and BM25 results are fused")
    ranker_weights: tuple[float, float] = Field((0.7, 0.3), description="dense, BM25 weights for `weighted`")

    @field_validator("uri")
    @classmethod
    def _uri_is_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https", "tcp") or not parsed.hostname or not parsed.port:
            raise ValueError(
                f"{v!r} is not a Milvus URL; use http://HOST:PORT, e.g. http://127.0.0.1:19530"
            )
        return v

    @model_validator(mode="after")
    def _index_on_local_engine(self) -> "MilvusConfig":
        if self.embedded_engine == "milvus-lite-2.5" and self.index_type not in ("FLAT", "IVF_FLAT"):
            raise ValueError(
                f"index_type {self.index_type} is not available on milvus.local_engine milvus-lite-2.5 (FLAT and IVF_FLAT only); "
                "set milvus.index_type: IVF_FLAT, or milvus.local_engine: milvus-lite-3"
            )
        if self.embedded_engine == "milvus-lite-3" and self.text_analyzer not in (None, "standard"):
            raise ValueError(f"text_analyzer {self.text_analyzer} is not available on milvus.local_engine milvus-lite-3 "
                             "(standard only); set milvus.text_analyzer: standard, or milvus.local_engine: milvus-lite-2.5")
        return self

    @property
    def embedded_engine(self) -> str | None:
        """The Milvus Lite engine `tunedex up` runs for this config; None for a Milvus server."""
        return self.local_engine if self.local_server and self.is_loopback else None

    @property
    def analyzer(self) -> str:
        """The BM25 analyzer new collections get."""
        return self.text_analyzer or ("standard" if self.embedded_engine == "milvus-lite-3" else "english")

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        if not v or not v.replace("_", "").isalnum() or v[0].isdigit():
            raise ValueError(f"{v!r} is not a valid collection name; use letters, digits and '_', starting with a letter")
        return v

    @property
    def dense_index_params(self) -> dict[str, Any]:
        return self.index_params if self.index_params is not None else _INDEX_DEFAULTS[self.index_type][0]

    @property
    def dense_search_params(self) -> dict[str, Any]:
        return self.search_params if self.search_params is not None else _INDEX_DEFAULTS[self.index_type][1]

    @property
    def is_loopback(self) -> bool:
        host = urlparse(self.uri).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def port(self) -> int:
        return int(urlparse(self.uri).port)


class RayConfig(Section):
    address: str = Field("127.0.0.1:6379", description="Ray GCS address, or ray://HOST:10001 for a remote cluster")
    local_head: bool = Field(True, description="`tunedex up` starts a Ray head for a loopback address")
    dashboard_port: int = Field(8265, ge=1, le=65535)
    client_server_port: int = Field(10001, ge=1, le=65535, description="Ray Client (ray://) port of the local head")
    num_cpus: int | None = Field(4, ge=1, description="logical CPUs the local head advertises")
    metrics_export_port: int = Field(8080, ge=1, le=65535, description="Prometheus metrics of the local head (Serve's and tunedex's)")
    auth_token_path: Path | None = Field(None, description="Ray auth token file; default DATA_DIR/ray_auth_token")

    @property
    def host(self) -> str:
        return self.address.removeprefix("ray://").rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[-1])

    @property
    def is_client(self) -> bool:
        """Reached through Ray Client (a `ray://` address), not the head's GCS port."""
        return self.address.startswith("ray://")

    @property
    def is_local(self) -> bool:
        """A head on this machine, reached directly (not through a `ray://` client address)."""
        return not self.is_client and self.host in ("127.0.0.1", "localhost")


class EmbeddingConfig(Section):
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model: packaged name, hub id or local path")
    batch_size: int = Field(64, ge=1, le=4096)
    device: str = "cpu"
    backend: Literal["openvino", "torch"] = Field(
        "openvino", description="openvino: on CPU, the model exported once to ONNX and run by OpenVINO (the same vectors, "
        "cosine >= 0.999, faster); torch: sentence-transformers encode (always used on a GPU)"
    )

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_renamed(cls, value: object) -> object:
        if value == "onnx":
            raise ValueError("'onnx' (onnxruntime) was replaced by 'openvino', which runs the same exported model; "
                             "set embedding.backend: openvino")
        return value

    replicas: int = Field(0, ge=0, description="0: embed in the indexing process; N: a Ray Data pool of N replicas")
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0, description="set 1 (and device: cuda) on a GPU cluster")


class ChunkingConfig(Section):
    chunk_size: int = Field(200, ge=16, description="tokens of the embedding model's tokenizer per chunk")
    chunk_overlap: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkingConfig":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})"
            )
        return self


class CorpusConfig(Section):
    path: Path | None = Field(None, description="corpus root; `tunedex index PATH` overrides it")
    include: list[str] = Field(default_factory=lambda: ["**/*.md", "**/*.txt", "**/*.jsonl", "**/*.html"])
    exclude: list[str] = Field(default_factory=list)
    jsonl_id_field: str = "id"
    jsonl_text_field: str = "text"
    max_doc_bytes: int = Field(5_000_000, ge=1)


class TinyModelConfig(Section):
    architecture: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(2, ge=1, le=48)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    vocab_size: int = Field(4000, ge=300, description="size of the BPE tokenizer trained locally")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description=(
        "dropout (GPT-2: embeddings, attention, residuals; Llama: attention); None keeps the architecture's "
        "default (GPT-2 0.1, Llama 0)"))

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class TrainRayConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    storage_path: Path | None = Field(None, description="Ray Train storage (shared on a cluster); default DATA_DIR/ray_results")
    run_name: str | None = Field(None, description="a run of the same name resumes from its last checkpoint")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint (-1: unlimited)")
    checkpoint_upload_delay_s: float = Field(0.0, ge=0, description=(
        "fault injection: seconds every rank but 0 waits before uploading its checkpoint shards, so a kill can land "
        "between ranks (the S7 test); leave 0"))


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="PEFT target_modules")
    merge: bool = Field(True, description=(
        "merge the adapter into the base weights on export (a plain model); false exports the adapter alone, "
        "served by vLLM on its base (enable_lora): releases on one base share its weights. Needs an architecture "
        "vLLM serves LoRA for (Llama, Mistral, Qwen, ...; not GPT-2) and a base that is a local dir or `tiny`"))


class FinetuneConfig(Section):
    base_model: str = Field("tiny", description="'tiny' builds a small model from `tiny`; else a hub id or local path")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False
    train_file: Path | None = Field(None, description="JSONL of {messages}, {prompt, completion} or {text}")
    adapter: Literal["full", "lora"] = Field("full", description="lora trains adapters (finetune.lora.merge: merged on export or served as adapters)")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    max_length: int = Field(256, ge=8)
    overflow: Literal["truncate", "drop"] = Field("truncate", description="examples over max_length")
    packing: bool = Field(False, description="pack examples into max_length sequences; attention stays per example")
    completion_only_loss: bool = Field(True, description="loss on assistant turns / completions only")
    eval_ratio: float = Field(0.1, ge=0, lt=1)
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    max_steps: int = Field(60, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume point after a failure)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    seed: int = 0
    deepspeed: Literal["zero0", "zero1", "zero2", "zero3"] = "zero2"
    bf16: Literal["auto"] | bool = Field("auto", description="auto: bf16 on GPUs, fp32 on CPU")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state in CPU memory (GPU runs)")
    output_dir: Path | None = Field(None, description="where the exported model goes; default DATA_DIR/models/RUN")
    ray: TrainRayConfig = Field(default_factory=TrainRayConfig)

    @model_validator(mode="after")
    def _servable_adapter(self) -> "FinetuneConfig":
        if self.adapter == "lora" and not self.lora.merge and self.base_model == "tiny" and self.tiny.architecture == "gpt2":
            raise ValueError("finetune.lora.merge: false serves the adapter with vLLM, which has no LoRA for GPT-2; "
                             "set finetune.tiny.architecture: llama or finetune.lora.merge: true")
        return self


SERVE_DEPLOYMENTS = ("Ingress", "Release", "Retriever", "Generator", "BaseGenerator")
SERVE_OPTIONS = {"num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "backpressure_config",
                 "ray_actor_options", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s",
                 "health_check_period_s", "health_check_timeout_s"}


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    top_k: int = Field(4, ge=1, le=100)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    api_key: str | None = Field(None, description="Bearer key every non-health route requires")
    api_key_file: Path | None = Field(None, description="file holding the key (a mounted Secret); read when api_key is unset")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_header_bytes: int = Field(16_384, ge=1024, description="larger request headers (all fields) get 431")
    max_prompt_chars: int = Field(16_000, ge=100, description="longer chat prompts (all messages) get 422")
    max_batch_size: int = Field(16, ge=1, le=256, description=(
        "sequences the engine generates at once (vLLM max_num_seqs); the Generator takes twice as many requests"))
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "vLLM engine arguments passed through verbatim (AsyncEngineArgs, as Ray Serve LLM's engine_kwargs): "
        "gpu_memory_utilization, max_model_len, kv_cache_memory_bytes, tensor_parallel_size, ..."))
    serve_base_model: bool = Field(False, description="also load the release's base model, for `mode: rag`")
    system_prompt: str | None = Field(None, max_length=20_000, description=(
        "the assistant's instructions (default: tunedex's own); answers that repeat them are withheld"))
    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Ray Serve options per deployment (Ingress, Release, Retriever, Generator, BaseGenerator)",
    )

    @model_validator(mode="after")
    def _key_from_file(self) -> "ServeConfig":
        if self.api_key is None and self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"api_key_file {self.api_key_file} cannot be read ({exc}); mount the key there "
                                 "or set api_key") from None
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} is empty; put the key in it")
            self.api_key = key
        return self

    @field_validator("deployments")
    @classmethod
    def _serve_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, options in value.items():
            if name not in SERVE_DEPLOYMENTS:
                raise ValueError(f"unknown deployment {name!r}; expected one of {', '.join(SERVE_DEPLOYMENTS)}")
            unknown = sorted(set(options) - SERVE_OPTIONS)
            if unknown:
                raise ValueError(f"{name}: {', '.join(unknown)} is not a Ray Serve deployment option this endpoint "
                                 f"passes on; use {', '.join(sorted(SERVE_OPTIONS))}")
        return value

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class EvaluateConfig(Section):
    qa_file: Path | None = Field(None, description="QA set (JSONL: question, answer, doc_ids, split) the gate scores")
    strategy: Literal["hybrid", "finetuned"] = Field("hybrid", description="how the gate's answers are produced")
    metric: Literal["exact", "contains", "f1"] = Field("f1", description="answer score the gate compares")
    min_score: float = Field(0.0, ge=0, le=1, description="a candidate below this is not promoted")
    max_regression: float = Field(0.0, ge=0, le=1, description="how far below the serving release a candidate may score")
    max_questions: int | None = Field(None, ge=1, description="score only the first N questions")
    style_pattern: str | None = Field(None, description="regex an answer in the house style matches (style adherence)")
    gpu_hour_usd: float = Field(2.0, ge=0, description="price of one accelerator hour, for cost per 1k queries")
    gpus_per_replica: float = Field(1.0, ge=0, description="accelerators one generator replica holds")
    embedding_usd_per_1m_tokens: float = Field(0.02, ge=0, description="embedding price, for query and corpus embedding cost")
    facts_change: Literal["daily", "weekly", "rarely"] = Field("daily", description="how often the knowledge changes (decision criterion)")
    need_attribution: bool = Field(True, description="answers must cite their sources (decision criterion)")
    latency_budget_ms: float | None = Field(None, gt=0, description="p95 latency a strategy must meet (decision criterion)")

    @field_validator("style_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression ({exc})") from None
        return value


class PrefectConfig(Section):
    api_url: str | None = Field(None, description="Prefect server API; unset runs on a local ephemeral API")
    reembed_cron: str = Field("0 2 * * *", description="schedule of the nightly-reembed deployment")
    refresh_cron: str | None = Field(None, description="schedule of the refresh deployment (re-embed, fine-tune, evaluate, promote)")
    timezone: str = Field("UTC", description="IANA time zone the cron schedules are read in")
    work_pool: str | None = Field(None, description="deploy to this work pool (e.g. a Kubernetes one); unset: `tunedex worker` serves them")
    crash_after_s: int = Field(50, ge=40, description="mark a served run Crashed after this long without a heartbeat (one every 31 s)")

    @field_validator("reembed_cron", "refresh_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) not in (5, 6):
            raise ValueError(f"{value!r} is not a cron expression; use five fields, e.g. '0 2 * * *' (02:00 daily)")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone; use e.g. 'UTC' or 'Europe/Berlin'") from None
        return value


class TunedexConfig(Section):
    data_dir: Path = Field(Path(".tunedex"), description="registry, local services' data, models and logs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    milvus: MilvusConfig = Field(default_factory=MilvusConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)

    @property
    def ray_token_path(self) -> Path:
        return self.ray.auth_token_path or self.data_dir / "ray_auth_token"

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    def corpus_root(self, given: str | Path | None, how: str) -> Path:
        """The corpus a command indexes: `given`, else corpus.path; `how` says how to pass one (e.g.
        "`tunedex index PATH`") in the error when neither is set."""
        root = Path(given) if given else self.corpus.path
        if root is None:
            raise ConfigError(f"no corpus: pass {how} or set corpus.path in the config")
        return root

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TunedexConfig:
    """Load YAML (or defaults when `path` is None), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return TunedexConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [format_problem(err) for err in exc.errors()]
        raise ConfigError(
            f"{source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n"
            + "\n".join(f"  - {p}" for p in problems)
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing file, e.g. configs/local.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}; fix the syntax at the line shown") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (e.g. `milvus: {{uri: ...}}`), not {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. finetune.max_steps=20")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value else ""


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "dict": "a mapping", "model": "a mapping", "list": "a list", "path": "a path"}


def format_problem(err: dict[str, Any]) -> str:
    """One line per pydantic error: dotted key, what is wrong, how to fix it."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<root>"
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(sorted(known))}."
        return f"{key}: unknown key; {hint} Remove or rename it."
    if kind == "literal_error":
        return f"{key}: {got!r} is not allowed; {err['msg'].replace('Input should be', 'use')}"
    if kind in ("int_parsing", "int_type", "float_parsing", "float_type", "bool_parsing", "bool_type",
                "string_type", "dict_type", "list_type", "model_type", "path_type"):
        want = _TYPE_WORDS[kind.split("_")[0]]
        return f"{key}: expected {want}, got {got!r}; set {want}"
    if kind.startswith(("greater", "less")):
        return f"{key}: {got!r} is out of range; {err['msg'].replace('Input should be', 'use a value')}"
    if kind == "value_error":
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    return f"{key}: {err['msg']} (got {got!r})"


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = TunedexConfig
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def dump_config(cfg: TunedexConfig) -> str:
    """The effective config as YAML, secrets masked."""
    data = cfg.model_dump(mode="json")
    for section, key in (("milvus", "token"), ("serve", "api_key")):
        if data[section].get(key):
            data[section][key] = "***"
    return yaml.safe_dump(data, sort_keys=False)
