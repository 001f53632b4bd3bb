"""Redaction of secrets from anything the app writes out: files, console lines, tracker params.

Secrets reach the app only through the environment (a Kubernetes Secret mounted as env
vars, or `export` on a workstation) and never through the config. Two shapes are removed:
the values of the known secret env vars, and the userinfo of URIs
(`s3://KEY:SECRET@bucket/path` -> `s3://***@bucket/path`).

    >>> redact("s3://AKIAEXAMPLE:abc%2Fdef@bucket/runs")
    's3://***@bucket/runs'
"""

from __future__ import annotations

import os
import re
from typing import Any

from ray_app.errors import UserError

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN")
MASK = "***"
# Shorter values would also match ordinary words and paths ("test"); real keys are longer.
MIN_SECRET_LEN = 8
# scheme://userinfo@host; userinfo cannot hold an unescaped '/', '?' or '#' (an S3 secret
# key's '/' is written %2F), so `gs://bucket/file@v1` is left alone.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^@/?#\s\"']+@")


def secret_values() -> list[str]:
    """The values of the secret env vars set in this process, longest first."""
    values = {os.environ.get(name, "") for name in SECRET_ENV}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def redact(value: Any) -> Any:
    """`value` with secrets masked: strings, and the strings inside dicts, lists and tuples
    (keys too); other values are returned as they are."""
    if isinstance(value, str):
        text = _USERINFO.sub(rf"\1{MASK}@", value)
        for secret in secret_values():
            text = text.replace(secret, MASK)
        return text
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def has_userinfo(text: str) -> bool:
    """True when `text` holds a URI with credentials (`scheme://user:password@host`)."""
    return bool(_USERINFO.search(text))


def keys_with_credentials(raw: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a config dict whose values hold URI credentials.

    >>> keys_with_credentials({"run": {"storage_path": "s3://K:S@bucket/runs"}})
    ['run.storage_path']
    """
    if isinstance(raw, dict):
        return [k for key, value in raw.items()
                for k in keys_with_credentials(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(raw, list):
        return [k for value in raw for k in keys_with_credentials(value, prefix)]
    return [prefix] if isinstance(raw, str) and has_userinfo(raw) else []


def refuse_credentials(raw: dict[str, Any], where: str) -> None:
    """Raises UserError when a config that is about to leave this machine holds credentials."""
    keys = sorted(set(keys_with_credentials(raw)))
    if keys:
        raise UserError(
            f"{', '.join(keys)} hold credentials in a URI (scheme://user:secret@...), which "
            f"{where} would store in plain text. Remove them from the URI and give them as "
            "environment variables from a Kubernetes Secret (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...): see docs/kuberay.md.")
