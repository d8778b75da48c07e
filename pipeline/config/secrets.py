"""Secrets kept out of what is logged: config values, overrides, log records and params are masked (``redact``)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

SECRET_WORDS = ("password", "secret", "token", "access_key", "api_key", "credential")
# Environment variables whose value is masked wherever it appears: names with a secret word, "passwd", or ending
# in "key" (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, WANDB_API_KEY, ...), except those that name
# a file or socket holding one (AWS_SHARED_CREDENTIALS_FILE, SSH_AUTH_SOCK): their value is a path.
ENV_SECRET_WORDS = (*SECRET_WORDS, "passwd")
ENV_PATH_SUFFIXES = ("_file", "_path", "_dir", "_sock")
# Shorter values are not looked for: a variable such as HF_HUB_DISABLE_TOKEN=1 would mask every "1".
MIN_SECRET_LENGTH = 8


_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/\s@]+)@")  # scheme, user:password
_SECRET_ASSIGNMENT = re.compile(r"([^\s=]*(?:" + "|".join(SECRET_WORDS) + r")[^\s=]*=)\S+", re.IGNORECASE)


def secret_env_name(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret (``ENV_SECRET_WORDS``)."""
    lower = name.lower()
    return (any(word in lower for word in ENV_SECRET_WORDS) or lower.endswith("key")) and not lower.endswith(
        ENV_PATH_SUFFIXES
    )


def environment_secrets() -> list[str]:
    """The secrets this process's environment holds, longest first: the values of variables named like a secret
    and the passwords of URLs (``scheme://user:password@host``; a token given as the user), each at least
    ``MIN_SECRET_LENGTH`` characters long."""
    found = set()
    for name, value in os.environ.items():
        if secret_env_name(name):
            found.add(value)
        for match in _URL_CREDENTIALS.finditer(value):
            found.add(match.group(2).partition(":")[2] or match.group(2))
    return sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(value: Any) -> Any:
    """``value`` (a config, a list of overrides, a string) as it may be logged: the user:password of a
    URL, the value of a key that names a secret, ``key=value`` words of such keys and any text equal to a
    secret of the environment (``environment_secrets``) become ``***``."""
    return _redact(value, environment_secrets())


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {
            key: "***"
            if isinstance(key, str) and any(w in key.lower() for w in SECRET_WORDS) and value[key] not in (None, "")
            else _redact(value[key], secrets)
            for key in value
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(item, secrets) for item in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return _SECRET_ASSIGNMENT.sub(r"\1***", _URL_CREDENTIALS.sub(r"\1***@", value))
    return value


def mask_secrets(params: dict[str, Any]) -> dict[str, Any]:
    """Params as they may be logged (``redact``)."""
    return redact(dict(params))


class RedactingFilter(logging.Filter):
    """A log handler's filter: every record's text, traceback included, as it may be logged (``redact``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it as logging does
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
