"""The endpoint's control plane: start it, and swap releases under it without dropping a request.

A swap (`switch`): the target release's Serve application (`build_release_app`, named by the release id)
is deployed beside the serving one and must come up RUNNING (model loaded, collection loaded) before
anything changes; only then is the registry's pointer moved. The Ingress replicas follow the pointer
(`Ingress.refresh`) and every request reads their one `active` reference once, so in-flight requests
finish on the release they started on. The previous release stays loaded: rolling back to it is instant.
A release that fails to start is removed again and the serving one is untouched.

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
log = logging.getLogger(__name__)


# What a promotion did: recorded it in the registry only (no endpoint up), switched the endpoint to a release
# still loaded (a rollback inside the retire window), or loaded the release and then switched.
Swap = Literal["registry", "warm", "loaded"]


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


def deploy_release(config: Path, overrides: list[str], release: Release) -> bool:
    """Bring `release` up beside whatever is serving; return when it is RUNNING, and whether it had to be
    loaded (False: it was still loaded, e.g. the release a rollback goes back to)."""
    from ray import serve

    from tunedex.serving.app import ReleaseArgs, build_release_app

    if applications().get(release.release_id) == "RUNNING":
        return False
    registry.check_model_dir(Path(release.model_path))
    args = ReleaseArgs(config=str(config), overrides=overrides, release_id=release.release_id)
    try:
        serve.run(build_release_app(args), name=release.release_id, route_prefix=None)
    except Exception as exc:
        serve.delete(release.release_id)
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise SwapError(f"release {release.release_id} failed to start ({reason}); "
                        "nothing changed, the serving release keeps serving (see `serve status` and the Serve logs)") from None
    return True


def retire(keep: set[str]) -> list[str]:
    """Delete loaded release applications other than `keep`."""
    from ray import serve

    gone = [name for name in applications() if name != INGRESS_APP and name not in keep]
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
    deploy_release(config, overrides, release)
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
    keep = {release.release_id} | ({serving.release_id} if serving else set())
    retired = retire(keep)  # room for the new one: only the serving release (and the target if loaded) stay
    if retired:
        log.info("retired %s", ", ".join(retired))
    loaded = deploy_release(config, overrides, release)
    registry.promote(cfg.registry_dir, release)
    wait_serving(cfg, release.release_id)
    return "loaded" if loaded else "warm"


def promote(cfg: TunedexConfig, config: Path | None, overrides: list[str], release: Release) -> Swap:
    """Make `release` the promoted one: registry only when no Ray (so no endpoint) is up, else `switch`."""
    from tunedex.infra import services

    if not cfg.ray.address.startswith("ray://") and not services.port_open(cfg.ray.host, cfg.ray.port):
        registry.promote(cfg.registry_dir, release)
        return "registry"
    with services.connect_ray(cfg):
        if config is None and endpoint_running():
            raise SwapError("a running endpoint loads the release with its config; pass the config file (-c CONFIG)")
        return switch(cfg, config or Path("."), overrides, release)
