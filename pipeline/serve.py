"""Serve a pyfunc model (``speech-restoration``, a train_asr ``model/``) with a bounded request body.

    python -m pipeline.serve -m models:/speech-restoration/1 [--host 127.0.0.1] [--port 5001]
                             [--max-body-mb 64] [--workers 1]

This is MLflow's own scoring server (``mlflow.pyfunc.scoring_server.init``: the same ``/invocations``,
``/ping``, ``/health`` and ``/version`` as ``mlflow models serve``) run by uvicorn behind one small ASGI
middleware. MLflow reads and parses a request's whole body before the model sees it and has no size
limit; the middleware answers before that:

- 413 when ``Content-Length`` says the body is larger than ``--max-body-mb`` (nothing of it is read), or
  when a body sent without it (chunked) passes the limit (reading stops there);
- 415 for a POST whose content type is not ``application/json`` (MLflow's CSV and Parquet parsers answer
  a malformed body with a stack trace).

Each answer is one short JSON message, ``{"error_code": ..., "message": ...}``, as MLflow's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024
MODEL_ENV, LIMIT_ENV = "PIPELINE_SERVE_MODEL", "PIPELINE_SERVE_MAX_BODY_BYTES"  # what each worker reads


class ClientGone(Exception):
    """The client disconnected before it sent the whole body."""


class BodyLimit:
    """ASGI middleware: a request body of at most ``max_bytes`` and, for a POST, JSON only."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self.refusal(scope["method"], headers)
        if refusal:
            return await answer(send, *refusal)
        try:
            body = await self.read_body(receive)
        except ClientGone:
            return
        if body is None:
            return await answer(send, 413, "RESOURCE_LIMIT_EXCEEDED", self.too_large())
        await self.app(scope, replay(body, receive), send)

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """What the headers alone refuse: (status, error code, message), or None."""
        length = headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            return 400, "BAD_REQUEST", "Content-Length must be a whole number of bytes"
        if length is not None and int(length) > self.max_bytes:
            return 413, "RESOURCE_LIMIT_EXCEEDED", self.too_large()
        mime = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and mime != "application/json":
            return (
                415,
                "BAD_REQUEST",
                (
                    "this server takes only Content-Type: application/json, e.g. "
                    '{"dataframe_records": [{"audio_base64": "<a WAV or FLAC file, base64>"}]}'
                ),
            )
        return None

    def too_large(self) -> str:
        return (
            f"the request body is larger than this server's limit of {self.max_bytes / MB:g} MB; send shorter "
            "audio or fewer rows per request (a WAV or FLAC file as audio_base64 is smaller than float samples)"
        )

    async def read_body(self, receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (the rest is never read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that gives the app the body already read, then whatever the client sends next."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


async def answer(send, status: int, error_code: str, message: str) -> None:
    log.warning("Refused a request with %d: %s", status, message)
    content = json.dumps({"error_code": error_code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


def create_app(model_path: str | None = None, max_bytes: int | None = None):
    """MLflow's scoring app for the model at ``model_path`` behind ``BodyLimit`` (each worker calls this;
    the arguments default to what ``main`` put in the environment)."""
    from mlflow.pyfunc import scoring_server

    from pipeline.engine.cli import setup_logging

    if not logging.getLogger().handlers:  # a worker process that uvicorn started
        setup_logging()
    model = scoring_server.load_model_with_mlflow_config(model_path or os.environ[MODEL_ENV])
    return BodyLimit(scoring_server.init(model), max_bytes or int(os.environ[LIMIT_ENV]))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.split("\n")[0])
    parser.add_argument(
        "-m", "--model-uri", required=True, help="models:/<name>/<version>, runs:/<id>/model or a directory"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (MB) (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    args = parser.parse_args(argv)
    if args.max_body_mb <= 0 or args.workers < 1:
        parser.error("--max-body-mb must be above 0 and --workers at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from pipeline.engine.cli import EXIT_BAD_INPUT, setup_logging
    from pipeline.engine.resume import ResumeError, fetch_model

    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="serve-") as workdir:  # the workers load the model from it
        try:  # downloaded once, not by every worker
            path = str(fetch_model(args.model_uri, Path(workdir)))
        except ResumeError as err:
            log.error("%s", err)
            return EXIT_BAD_INPUT
        os.environ[MODEL_ENV], os.environ[LIMIT_ENV] = path, str(int(args.max_body_mb * MB))
        log.info(
            "Serving %s on http://%s:%d (request bodies up to %g MB, JSON only)",
            args.model_uri,
            args.host,
            args.port,
            args.max_body_mb,
        )
        uvicorn.run("pipeline.serve:create_app", factory=True, host=args.host, port=args.port, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
