"""The `tunedex` command line: a thin Typer app over flows, workers, serving and infra."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from tunedex.infra.config import ConfigError, TunedexConfig, dump_config, load_config
from tunedex.infra.errors import TunedexError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Check and show configuration.")
flows_app = typer.Typer(no_args_is_help=True, help="Run Prefect flows.")
app.add_typer(config_app, name="config")
app.add_typer(flows_app, name="flows")

DEFAULT_CONFIG = "configs/local.yaml"
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help=f"tunedex YAML config (default: $TUNEDEX_CONFIG, else {DEFAULT_CONFIG} if present)"),
]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a key, e.g. --set serve.port=8001")]

FLOWS = ("nightly-reembed", "finetune", "evaluate-and-promote", "refresh", "corpus-watch")


def config_path(path: Path | None) -> Path | None:
    if path is not None:
        return path
    if os.environ.get("TUNEDEX_CONFIG"):
        return Path(os.environ["TUNEDEX_CONFIG"])
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else None


def setup(path: Path | None, overrides: list[str] | None = None) -> TunedexConfig:
    """Entry-point setup: load the config, configure logging, point Ray clients at the token."""
    from tunedex.infra.logs import setup_logging
    from tunedex.infra.services import ray_env

    cfg = load_config(config_path(path), overrides)
    setup_logging(cfg.log_level)
    os.environ.update(ray_env(cfg))
    return cfg


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known failures (TunedexError, a missing file) print one clear line and exit 1 (2 for config errors),
    never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TunedexError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 1)) from None

    return wrapper


@config_app.command("check")
@friendly_errors
def config_check(
    file: Path,
    cluster: Annotated[bool, typer.Option("--cluster", help="also check what Kubernetes needs (the manifests in k8s/)")] = False,
) -> None:
    """Validate FILE; list every problem with its fix."""
    if cluster:
        from tunedex.infra.k8s import check_cluster_config

        check_cluster_config(file)
        typer.echo(f"{file}: ok for a cluster (kubectl apply -k k8s/overlays/dev; see k8s/README.md)")
        return
    load_config(file)
    typer.echo(f"{file}: ok")


@config_app.command("show")
@friendly_errors
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective config, defaults filled in (secrets masked)."""
    typer.echo(dump_config(load_config(config_path(config), set_)), nl=False)


@app.command()
@friendly_errors
def up(config: ConfigOpt = None) -> None:
    """Start the local services: a Milvus Lite server and a Ray head (token auth on)."""
    from tunedex.infra import services

    cfg = setup(config)
    for st in services.up(cfg):
        typer.echo(f"{st.name:7} up   {st.address}  {st.detail}")


@app.command()
@friendly_errors
def down(config: ConfigOpt = None) -> None:
    """Stop the local services that `tunedex up` started."""
    from tunedex.infra import services

    cfg = setup(config)
    stopped = services.down(cfg)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


@app.command()
@friendly_errors
def status(config: ConfigOpt = None) -> None:
    """Show the local services, the promoted release and the endpoint."""
    import httpx

    from tunedex.infra import services
    from tunedex.infra.registry import current_release

    cfg = setup(config)
    all_up = True
    for st in services.status(cfg):
        all_up &= st.running
        typer.echo(f"{st.name:7} {'up' if st.running else 'DOWN':4} {st.address}  {st.detail}")
    release = current_release(cfg.registry_dir)
    typer.echo(f"release {release.release_id} model {release.model_path} collection {release.collection}"
               if release else "release none (run `tunedex promote`)")
    try:
        ready = httpx.get(f"{cfg.serve.url}/readyz", timeout=2).json()
        typer.echo(f"serve   up   {cfg.serve.url}  serving {ready.get('release_id')}")
    except (httpx.HTTPError, ValueError):
        typer.echo(f"serve   DOWN {cfg.serve.url}  (run `tunedex serve`)")
    if not all_up:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def doctor(config: ConfigOpt = None) -> None:
    """Check that the Ray control plane refuses requests without the token; exit 1 on any problem."""
    from tunedex.infra.doctor import probe

    cfg = setup(config)  # sets RAY_AUTH_MODE=token and the token file, as every tunedex process does
    findings = probe(cfg)
    for f in findings:
        typer.echo(f"{'ok   ' if f.ok else 'ERROR'} {f.what}: {f.detail}")
    if not all(f.ok for f in findings):
        raise typer.Exit(1)


@app.command("demo-data")
@friendly_errors
def demo_data(
    out: Path,
    products: int = typer.Option(30, min=3, help="products in the day-1 catalog"),
    chunks: int = typer.Option(1, min=1, max=10, help="retrieved chunks each grounded example shows (= serve.top_k)"),
) -> None:
    """Write the synthetic knowledge base (day 1, day 2), training examples and a QA set to OUT."""
    from tunedex.demo_data import write_demo_data

    paths = write_demo_data(out, n_products=products, chunks=chunks)
    for name, path in paths.items():
        typer.echo(f"{name:5} {path}")


@app.command("demo-effect")
@friendly_errors
def demo_effect(
    out: Annotated[Path, typer.Argument(help="directory for its data, models and report")] = Path("demo-effect"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show fine-tune vs RAG vs both for real (tiny models, CPU, ~8 min on 2 cores): pretrain a base on reading
    practice, fine-tune it on day 1, index day 2, measure the four strategies on the day-2 questions."""
    from tunedex.demo_effect import run

    setup(config, set_)
    data = run(config_path(config), set_ or [], out, echo=typer.echo)
    print_report(data, *data["paths"])


@app.command()
@friendly_errors
def index(
    corpus: Annotated[Optional[Path], typer.Argument(help="corpus root (default: corpus.path)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan; embed and write nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the full report as JSON"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when any document was skipped"),
) -> None:
    """Index CORPUS into Milvus: embed new and changed chunks, delete removed ones."""
    from tunedex.workers.embed import index_corpus

    cfg = setup(config, set_)
    root = cfg.corpus_root(corpus, "`tunedex index PATH`")
    report = index_corpus(cfg, root, dry_run=dry_run)
    for s in report.skipped:
        typer.echo(f"skipped {s['doc_id']}: {s['reason']}", err=True)
    typer.echo(report.to_json() if as_json else report.summary)
    if strict and report.docs_failed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def watch(
    corpus: Annotated[Optional[Path], typer.Argument(help="corpus root (default: corpus.path)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    poll: bool = typer.Option(False, "--poll", help="poll for changes instead of inotify (network volumes)"),
    debounce: float = typer.Option(1.0, help="seconds without a change before a pass starts"),
) -> None:
    """Keep the index fresh: index CORPUS now, then again after each change settles (Ctrl-C stops)."""
    from tunedex.workers.watch import watch_corpus

    cfg = setup(config, set_)
    root = cfg.corpus_root(corpus, "`tunedex watch PATH`")

    def report(result: Any, why: str) -> None:
        typer.echo(f"{time.strftime('%H:%M:%S')} pass after {why}: {result.summary}")

    # Ctrl-C or SIGTERM (a pod stopping) ends the watch after the pass under way; handlers set here also
    # work where SIGINT was inherited as ignored (a process started in the background)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(f"watching {root} ({'polling' if poll else 'inotify'}, debounce {debounce:g} s); Ctrl-C stops")
    watch_corpus(cfg, Path(root), report, debounce_s=debounce, poll=poll, stop=stop)
    typer.echo("stopped")


@app.command()
@friendly_errors
def finetune(
    args: Annotated[Optional[list[str]], typer.Argument(help="CONFIG.yaml (or use -c)", metavar="[CONFIG]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune the model with DeepSpeed on Ray Train; export safetensors + tokenizer."""
    args = list(args or [])
    if args and "=" not in args[0]:
        config = Path(args.pop(0))
    if args:  # one override syntax for every command: a bare key=value is refused with the --set form
        extra = args[0]
        raise ConfigError(f"{extra!r} looks like an override: pass it as --set {extra} (e.g. tunedex finetune "
                          f"{config or 'CONFIG.yaml'} --set {extra})" if "=" in extra else
                          f"unexpected argument {extra!r}: finetune takes one CONFIG file and --set KEY=VALUE overrides")
    cfg = setup(config, set_)
    from tunedex.infra.services import connect_ray
    from tunedex.workers.finetune import main

    with connect_ray(cfg, log_to_driver=True):
        result = main(cfg)
    typer.echo(result.summary)  # after the disconnect flushed the workers' logs: the summary comes last


@app.command()
@friendly_errors
def promote(
    release_id: Annotated[Optional[str], typer.Argument(help="an existing release to serve again")] = None,
    model: Annotated[Optional[Path], typer.Option(help="exported model dir (default: the newest registered fine-tune)")] = None,
    collection: Annotated[Optional[str], typer.Option(help="collection (default: the live collection, the registry's live.json)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Record a release = (model, collection) and serve it; a running endpoint swaps without dropping requests."""
    from tunedex.infra import registry

    cfg = setup(config, set_)
    if release_id:
        release = registry.load_release(cfg.registry_dir, release_id)
    else:
        release = registry.candidate_release(cfg, model or newest_model(cfg), collection)
        registry.save_release(cfg.registry_dir, release)
    swap = promote_release(cfg, config, set_, release)
    typer.echo(f"promoted {release.release_id}: model {release.model_path}, collection {release.collection}"
               + SWAPPED[swap])


# what `promote` and `rollback` add to their line, by what the promotion did (serving.control.Swap)
SWAPPED = {"registry": "", "warm": " (the endpoint now serves it; it was still loaded)",
           "shared": " (the endpoint now serves it; its model was already loaded)",
           "loaded": " (the endpoint now serves it)"}


def promote_release(cfg: TunedexConfig, config: Path | None, overrides: list[str] | None, release: Any) -> str:
    from tunedex.serving.control import promote

    path = config_path(config)
    return promote(cfg, path.resolve() if path else None, overrides or [], release)


def newest_model(cfg: TunedexConfig) -> Path:
    from tunedex.infra.registry import RegistryError, latest_model

    model = latest_model(cfg.registry_dir)
    if model is None:
        raise RegistryError(f"no model version in {cfg.registry_dir}; run `tunedex finetune` or pass --model")
    return model


@app.command()
@friendly_errors
def rollback(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Serve the previously promoted release again (instant while it is still loaded)."""
    from tunedex.infra.registry import previous_release

    cfg = setup(config, set_)
    release = previous_release(cfg.registry_dir)
    swap = promote_release(cfg, config, set_, release)
    typer.echo(f"rolled back to {release.release_id}" + SWAPPED[swap])


@app.command()
@friendly_errors
def serve(config: ConfigOpt = None, set_: SetOpt = None, timeout: float = typer.Option(300, help="seconds to wait for ready")) -> None:
    """Deploy the endpoint for the promoted release on the local Ray; print its URL."""
    cfg = setup(config, set_)
    from tunedex.infra.services import connect_ray
    from tunedex.serving import control

    path = config_path(config)
    if not path:
        raise ConfigError("`tunedex serve` needs a config file (replicas load it); pass -c configs/local.yaml")
    with connect_ray(cfg):
        release = control.start(cfg, path.resolve(), set_ or [], timeout)
    typer.echo(f"serving {release.release_id} at {cfg.serve.url}")
    typer.echo(f"try: curl -s {cfg.serve.url}/v1/query -H 'Content-Type: application/json' "
               "-d '{\"question\": \"When is shipping free?\"}'")
    typer.echo(f"metrics (Serve's and tunedex's): http://127.0.0.1:{cfg.ray.metrics_export_port}/metrics")


@app.command()
@friendly_errors
def ask(
    question: str,
    config: ConfigOpt = None,
    mode: str = typer.Option("hybrid", help="hybrid | rag | finetuned | retrieve"),
    top_k: Optional[int] = typer.Option(None, help="chunks to retrieve"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Ask the endpoint a question; print the answer and its sources."""
    import httpx

    cfg = setup(config)
    headers = {"Authorization": f"Bearer {cfg.serve.api_key}"} if cfg.serve.api_key else {}
    try:
        resp = httpx.post(f"{cfg.serve.url}/v1/query", json={"question": question, "mode": mode, "top_k": top_k},
                          headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the endpoint at {cfg.serve.url} ({exc}); run `tunedex serve`", err=True)
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        typer.echo(f"error: {resp.status_code} {resp.text}", err=True)
        raise typer.Exit(1)
    body = resp.json()
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    typer.echo(f"Q: {question}\nA: {body['answer']}\n   ({body['release_id']}, {body['timings_ms']['total']:.0f} ms)")
    for src in body["sources"]:
        typer.echo(f"   [{src['index']}] {src['doc_id']} @{src['doc_version'][:8]} score {src['score']:.4f}")


@flows_app.command("run")
@friendly_errors
def flows_run(
    name: str,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    corpus: Optional[Path] = typer.Option(None, help="corpus root for nightly-reembed, refresh and corpus-watch (default: corpus.path)"),
    model: Optional[Path] = typer.Option(None, help="candidate model dir for evaluate-and-promote (default: newest)"),
) -> None:
    """Run flow NAME once, now, on the configured Prefect API (a local ephemeral one by default); print its
    result as one JSON line."""
    if name not in FLOWS:
        raise ConfigError(f"unknown flow {name!r}; known flows: {', '.join(FLOWS)}")
    cfg = setup(config, set_)
    prefect_env(cfg)
    from tunedex.flows.deploy import flows

    path = config_path(config)
    params: dict[str, Any] = {"config": str(path.resolve()) if path else None, "overrides": set_ or []}
    if name in ("finetune", "evaluate-and-promote", "refresh") and path is None:
        raise ConfigError(f"flow {name} hands its config to other processes; pass -c CONFIG")
    if name in ("nightly-reembed", "refresh", "corpus-watch"):
        params["corpus"] = str(corpus.resolve()) if corpus else None
    if name == "evaluate-and-promote":
        params["model"] = str(model.resolve()) if model else None
    result = flows()[name](**params)
    if name == "nightly-reembed":
        result = {k: result[k] for k in result if k != "skipped"}
    typer.echo(json.dumps(result, default=str))


@app.command()
@friendly_errors
def report(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    qa: Optional[Path] = typer.Option(None, help="QA set (default: evaluate.qa_file)"),
    release_id: Optional[str] = typer.Option(None, "--release", help="release to evaluate (default: the promoted one)"),
    model: Optional[Path] = typer.Option(None, help="evaluate this exported model dir with the live collection "
                                                    "(a candidate before `tunedex promote`) instead of a release"),
    strategies: str = typer.Option("base,finetuned,rag,hybrid", help="comma-separated: base, finetuned, rag, hybrid"),
    out: Path = typer.Option(Path("reports"), help="directory for report.json and report.html"),
    max_questions: Optional[int] = typer.Option(None, min=1, help="evaluate only the first N questions"),
) -> None:
    """Measure fine-tune vs RAG vs both on your QA set; print the table and a recommendation, write JSON + HTML."""
    from tunedex.infra import registry
    from tunedex.workers.evaluate import build_report
    from tunedex.workers.report import write

    cfg = setup(config, set_)
    qa_file = qa or cfg.evaluate.qa_file
    if qa_file is None:
        raise ConfigError("no QA set: pass --qa FILE or set evaluate.qa_file (try DIR/day2/qa.jsonl from `tunedex demo-data`)")
    if model is not None and release_id:
        raise ConfigError("pass --release or --model, not both")
    if model is not None:
        release = registry.candidate_release(cfg, model)
    elif release_id:
        release = registry.load_release(cfg.registry_dir, release_id)
    else:
        release = registry.current_release(cfg.registry_dir)
    if release is None:
        raise registry.RegistryError(f"no promoted release in {cfg.registry_dir}; run `tunedex promote` or pass --release")
    data = build_report(cfg, release, qa_file, [s.strip() for s in strategies.split(",") if s.strip()],
                        max_questions or cfg.evaluate.max_questions)
    print_report(data, *write(data, out))


def print_report(data: dict[str, Any], json_path: Path, html_path: Path) -> None:
    from tunedex.workers.report import table

    typer.echo(table(data))
    typer.echo("")
    for line in data["recommendation"]:
        typer.echo(line if line.startswith("recommendation") else f"  - {line}")
    typer.echo(f"report: {html_path} (data: {json_path})")


@app.command()
@friendly_errors
def schedule(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Register the flows as Prefect deployments, with the cron schedules from `prefect.*` (UI: Deployments)."""
    cfg = setup(config, set_)
    path = deployment_config(config)
    prefect_env(cfg)
    from tunedex.flows.deploy import apply_crash_detection, deployments

    apply_crash_detection(cfg)
    for deployment in deployments(cfg, path, set_ or []):
        deployment.apply()
        when = ", ".join(f"{s.schedule.cron} ({s.schedule.timezone})" for s in deployment.schedules) or "on demand"
        typer.echo(f"deployment {deployment.flow_name}/{deployment.name}: {when}")
    typer.echo("run them with `tunedex worker` (or a worker on prefect.work_pool)")


@app.command()
@friendly_errors
def worker(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Serve the deployments in this process: scheduled and triggered runs execute here (Ctrl-C stops)."""
    cfg = setup(config, set_)
    path = deployment_config(config)
    prefect_env(cfg)
    from tunedex.flows.deploy import serve_deployments

    serve_deployments(cfg, path, set_ or [])


def deployment_config(config: Path | None) -> str:
    path = config_path(config)
    if path is None:
        raise ConfigError("deployments hand their config file to every run; pass -c CONFIG")
    return str(path.resolve())


def prefect_env(cfg: TunedexConfig) -> None:
    """Point Prefect at the configured API, or at a local ephemeral one whose data lives in DATA_DIR."""
    if cfg.prefect.api_url:
        os.environ["PREFECT_API_URL"] = cfg.prefect.api_url
    else:
        os.environ.setdefault("PREFECT_HOME", str((cfg.data_dir / "prefect").resolve()))


def main() -> None:  # pragma: no cover - `python -m tunedex`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
