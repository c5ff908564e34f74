"""The MLflow tracking server a run talks to: an explicit MlflowClient with short timeouts, so a
server that is gone costs seconds, not the minutes of MLflow's default retries; and what a
server that does not answer at start is (one line, exit 2, before any training)."""

from __future__ import annotations

import logging
import os
from typing import Any

from finetune.config.schema import MlflowConfig
from finetune.errors import FinetuneError

# the client's retries, unless the user set them: 2 tries more, 1 s then 2 s apart, 10 s each at most
QUICK = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class Unreachable(Exception):
    """The server did not answer a request (or refused it); its first line says why."""


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise FinetuneError("tracking.mlflow needs MLflow: pip install 'finetune[mlflow]'") from None


def tracking_uri(settings: MlflowConfig) -> str:
    uri = settings.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise FinetuneError(
            "tracking.mlflow: no server; set tracking.mlflow.uri (e.g. http://mlflow:5000) or MLFLOW_TRACKING_URI"
        )
    return uri


def experiment_name(settings: MlflowConfig, default: str) -> str:
    """tracking.mlflow.experiment, else $MLFLOW_EXPERIMENT_NAME (as MLflow's own tools read it), else `default`."""
    return settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or default


class Server:
    """An MlflowClient on one tracking URI; every call that fails for the server's sake raises Unreachable."""

    def __init__(self, uri: str):
        require_mlflow()
        for key, value in QUICK.items():
            os.environ.setdefault(key, value)
        logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings: ours is one line
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        try:
            return getattr(self.client, method)(*args, **kwargs)
        except (MlflowException, RequestException, OSError) as exc:
            text = str(exc).strip()
            raise Unreachable(text.splitlines()[0][:300] if text else type(exc).__name__) from None

    def experiment(self, name: str) -> str:
        """The id of experiment `name`, created by whichever process asks first."""
        for _ in range(2):
            found = self.call("get_experiment_by_name", name)
            if found is not None:
                return found.experiment_id
            try:
                return self.call("create_experiment", name)
            except Unreachable:  # another process created it in between: the next look finds it
                continue
        raise Unreachable(f"experiment {name!r} can be neither found nor created")

    def refused(self, reason: str) -> FinetuneError:
        return FinetuneError(
            f"tracking.mlflow.uri {self.uri}: the server did not answer ({reason}); start it or fix the uri, "
            "or set tracking.mlflow: null to train without it"
        )
