"""What every flow shares: which failures are worth a retry, and how a flow reads its config."""

from __future__ import annotations

from tunedex.infra.config import TunedexConfig, load_config
from tunedex.infra.store import StoreUnavailable


def transient_errors() -> tuple[type[BaseException], ...]:
    """Milvus or Ray unreachable, a timeout: the next attempt may succeed. Anything else is bad input or a
    bug, and retrying it would only repeat the failure."""
    import requests
    from pymilvus.exceptions import ConnectError, MilvusUnavailableException

    return (StoreUnavailable, ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout, ConnectError, MilvusUnavailableException)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says "unreachable, try again".

    A Milvus server that goes away mid-write surfaces as a plain `MilvusException` with code CONNECT_FAILED
    (pymilvus gave up reconnecting), or as a gRPC UNAVAILABLE / DEADLINE_EXCEEDED; its class alone does not
    tell it from a rejected write."""
    import grpc
    from pymilvus.client.types import Status
    from pymilvus.exceptions import MilvusException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, transient_errors()):
            return True
        if isinstance(exc, MilvusException) and exc.code == Status.CONNECT_FAILED:
            return True
        code = getattr(exc, "code", None)  # grpc.Call has code(); a bare RpcError may not
        if isinstance(exc, grpc.RpcError) and callable(code) and code() in (grpc.StatusCode.UNAVAILABLE,
                                                                             grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def transient(task_obj, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not handled
        return is_transient(exc)
    return False


def flow_config(config: str | None, overrides: list[str] | None) -> TunedexConfig:
    return load_config(config, overrides or [])
