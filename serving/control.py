"""The endpoint's control plane: start it, and swap releases under it without dropping a request.

A swap (`switch`): the target release's Serve application (`build_release_app`, named by the release id)
is deployed beside the serving one and must come up RUNNING (model loaded, collection loaded) before
anything changes; only then is the registry's pointer moved. The Ingress replicas follow the pointer
(`Ingress.refresh`) and every request reads their one `active` reference once, so in-flight requests
finish on the release they started on. The previous release stays loaded: rolling back to it is instant.
A release that fails to start is removed again and the serving one is untouched.

The vLLM engines are applications of their own (`build_engine_app`, named `engine-<hash>` of what they load
and how), shared by every release on the same model: a release on a new index, or a LoRA adapter on a base
that is already loaded, starts without loading a model. Retiring a release deletes the engines no kept
release calls.

Ray and Serve calls are here, at the edge; the CLI and the flows call these functions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from tunedex.infra import registry
from tunedex.infra.config import TunedexConfig
from tunedex.infra.errors import TunedexError
from tunedex.infra.registry import Release

INGRESS_APP = "tunedex"
ENGINE_PREFIX = "engine-"  # a shared engine's application (serving.app.EngineSpec.app)
log = logging.getLogger(__name__)


# What a promotion did: recorded it in the registry only (no endpoint up), switched the endpoint to a release
# still loaded (a rollback inside the retire window), started the release on engines already running (its
# model was loaded for another release), or loaded its model and then switched.
Swap = Literal["registry", "warm", "shared", "loaded"]


class SwapError(TunedexError, RuntimeError):
    """A release could not be brought up; the one being served is unchanged."""


def applications() -> dict[str, str]:
    """Serve application name -> status, on the connected cluster."""
    from ray import serve

    from ray.serve.schema import ApplicationStatus

    # ApplicationStatus is a (str, Enum): its str() is "ApplicationStatus.RUNNING", its value "RUNNING"
    return {name: ApplicationStatus(app.status).value for name, app in serve.status().applications.items()}


def endpoint_running() -> bool:
    return INGRESS_APP in applications()


def deploy_release(cfg: TunedexConfig, config: Path, overrides: list[str], release: Release) -> Swap:
    """Bring `release` up beside whatever is serving; return when it is RUNNING, with what that took: nothing
    ("warm": it was still loaded, e.g. the release a rollback goes back to), no model load ("shared": its
    engines already run for another release, e.g. a new index or another adapter on the same base), or "loaded"."""
    from ray import serve

    from tunedex.serving.app import ReleaseArgs, build_engine_app, build_release_app, engines

    running = applications()
    if running.get(release.release_id) == "RUNNING":
        return "warm"
    registry.check_model_dir(Path(release.model_path))
    specs = {spec.app: spec for spec in engines(cfg, release).values()}
    started: list[str] = []
    try:
        for name, spec in specs.items():
            if running.get(name) != "RUNNING":
                started.append(name)
                serve.run(build_engine_app(spec), name=name, route_prefix=None)
        args = ReleaseArgs(config=str(config), overrides=overrides, release_id=release.release_id, shared_engines=True)
        serve.run(build_release_app(args), name=release.release_id, route_prefix=None)
    except Exception as exc:
        for name in [release.release_id, *started]:
            serve.delete(name)
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise SwapError(f"release {release.release_id} failed to start ({reason}); "
                        "nothing changed, the serving release keeps serving (see `serve status` and the Serve logs)") from None
    return "loaded" if started else "shared"


def retire(cfg: TunedexConfig, keep: list[Release]) -> list[str]:
    """Delete loaded release applications other than `keep`'s, then the engines no kept release runs on."""
    from ray import serve

    from tunedex.serving.app import engines

    running = applications()
    kept = {r.release_id for r in keep}
    for r in keep:  # a running release names the engines it calls (the config may have changed since it started)
        kept |= set(serve.get_app_handle(r.release_id).engine_apps.remote().result() if r.release_id in running
                    else (spec.app for spec in engines(cfg, r).values()))
    apps = [name for name in running if name != INGRESS_APP and name not in kept]
    gone = sorted(apps, key=lambda name: name.startswith(ENGINE_PREFIX))  # releases first, then their engines
    for name in gone:
        serve.delete(name)
    return gone


def wait_serving(cfg: TunedexConfig, release_id: str, timeout: float = 60.0) -> None:
    """Until `/readyz` names `release_id` several times in a row (each Ingress replica follows on its own)."""
    import httpx

    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{cfg.serve.url}/readyz", timeout=5)
            streak = streak + 1 if ready.status_code == 200 and ready.json().get("release_id") == release_id else 0
        except httpx.HTTPError:
            streak = 0
        if streak >= 5:
            return
        time.sleep(0.2)
    raise SwapError(f"the endpoint at {cfg.serve.url} did not report {release_id} within {timeout:.0f}s; see `serve status`")


def start(cfg: TunedexConfig, config: Path, overrides: list[str], timeout: float = 300.0) -> Release:
    """Deploy the promoted release and the Ingress in front of it; return when the endpoint answers."""
    from ray import serve

    from tunedex.serving.app import ServeArgs, build_app

    release = registry.current_release(cfg.registry_dir)
    if release is None:
        raise registry.RegistryError(f"no promoted release in {cfg.registry_dir}; run `tunedex promote` first")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    deploy_release(cfg, config, overrides, release)
    serve.run(build_app(ServeArgs(config=str(config), overrides=overrides)), name=INGRESS_APP, route_prefix="/")
    wait_serving(cfg, release.release_id, timeout)
    return release


def switch(cfg: TunedexConfig, config: Path, overrides: list[str], release: Release) -> Swap:
    """Make `release` the promoted one; with the endpoint up, it is loaded first (unless it still is) and
    served when ready."""
    if not endpoint_running():
        registry.promote(cfg.registry_dir, release)
        return "registry"
    serving = registry.current_release(cfg.registry_dir)
    retired = retire(cfg, [release] + ([serving] if serving else []))  # room for the new one: only the serving
    if retired:                                                       # release (and the target if loaded) stay
        log.info("retired %s", ", ".join(retired))
    swap = deploy_release(cfg, config, overrides, release)
    registry.promote(cfg.registry_dir, release)
    wait_serving(cfg, release.release_id)
    return swap


def promote(cfg: TunedexConfig, config: Path | None, overrides: list[str], release: Release) -> Swap:
    """Make `release` the promoted one: registry only when no Ray (so no endpoint) is up, else `switch`."""
    from tunedex.infra import services

    if not cfg.ray.is_client and not services.port_open(cfg.ray.host, cfg.ray.port):
        registry.promote(cfg.registry_dir, release)
        return "registry"
    with services.connect_ray(cfg):
        if config is None and endpoint_running():
            raise SwapError("a running endpoint loads the release with its config; pass the config file (-c CONFIG)")
        return switch(cfg, config or Path("."), overrides, release)
