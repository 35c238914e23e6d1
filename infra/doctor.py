"""`tunedex doctor`: is the Ray control plane closed to anyone without the token?

Ray's dashboard and Jobs API run code for whoever can reach them (CVE-2023-48022, "ShadowRay"); Ray 2.52
added token auth and 2.54 fixed CVE-2026-27482. The probes below ask the running cluster the questions an
attacker would, and `assess` turns the answers into findings (plain data, tested without a cluster).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from tunedex.infra.config import TunedexConfig


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    detail: str


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def assess(ray_version: str, auth_mode: str, unauthenticated_status: int | None, wrong_token_status: int | None,
           dashboard_exposed: bool | None, api_key_set: bool, serve_host: str) -> list[Finding]:
    """Findings from what was observed; `None` means the probe could not run (a remote cluster)."""
    v = version_tuple(ray_version)
    refused = lambda status: status in (401, 403)  # noqa: E731
    out = [
        Finding(v >= (2, 54), "ray version", f"{ray_version}" + ("" if v >= (2, 54) else
                " is older than 2.54 (CVE-2026-27482)" if v >= (2, 52) else " has no token auth (needs >= 2.52)")),
        Finding(auth_mode == "token", "RAY_AUTH_MODE", f"{auth_mode or 'unset'}" + ("" if auth_mode == "token" else
                "; set RAY_AUTH_MODE=token (tunedex sets it for its own processes)")),
    ]
    for label, status in (("dashboard without a token", unauthenticated_status),
                          ("dashboard with a wrong token", wrong_token_status)):
        if status is not None:
            out.append(Finding(refused(status), label, f"HTTP {status}" + ("" if refused(status) else
                       ": the Jobs API accepts requests without the right token; start Ray with token auth")))
    if dashboard_exposed is not None:
        out.append(Finding(not dashboard_exposed, "dashboard bound to loopback",
                           "reachable from this host's network address: start it with --dashboard-host 127.0.0.1"
                           if dashboard_exposed else "not reachable from this host's network address"))
    public = serve_host not in ("127.0.0.1", "localhost")
    out.append(Finding(api_key_set or not public, "endpoint API key",
                       "set" if api_key_set else ("none, and the endpoint listens beyond loopback: set serve.api_key_file"
                                                  if public else "none (loopback only)")))
    return out


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
        return None if address.startswith("127.") else address
    except OSError:
        return None


def probe(cfg: TunedexConfig) -> list[Finding]:
    """Ask the configured cluster; remote clusters get the version and settings checks only."""
    import httpx
    import ray

    from tunedex.infra.services import port_open

    dashboard = f"http://127.0.0.1:{cfg.ray.dashboard_port}"
    statuses: list[int | None] = [None, None]
    exposed = None
    if cfg.ray.is_local and port_open("127.0.0.1", cfg.ray.dashboard_port):
        for i, headers in enumerate(({}, {"Authorization": "Bearer not-the-token"})):
            statuses[i] = httpx.get(f"{dashboard}/api/jobs/", headers=headers, timeout=10).status_code
        address = non_loopback_address()
        exposed = port_open(address, cfg.ray.dashboard_port) if address else None
    return assess(ray.__version__, os.environ.get("RAY_AUTH_MODE", ""), statuses[0], statuses[1], exposed,
                  bool(cfg.serve.api_key), cfg.serve.host)
