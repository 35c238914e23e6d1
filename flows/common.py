"""What every flow shares: which failures are worth a retry, and how a flow reads its config."""

from __future__ import annotations

from tunedex.infra.config import TunedexConfig, load_config
from tunedex.infra.store import StoreUnavailable


def transient_errors() -> tuple[type[BaseException], ...]:
    """Milvus or Ray unreachable, a timeout: the next attempt may succeed. Anything else is bad input or a
    bug, and retrying it would only repeat the failure."""
    import requests

    return (StoreUnavailable, ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout)


def transient(task_obj, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    try:
        state.result()
    except transient_errors():
        return True
    except Exception:
        return False
    return False


def flow_config(config: str | None, overrides: list[str] | None) -> TunedexConfig:
    return load_config(config, overrides or [])
