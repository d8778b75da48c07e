"""python -m pipeline.serve: MLflow's scoring server behind a body-size and content-type check."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from helpers import CHAINS, PYTHON, REPO, demo_wave, env_for, free_port, http_status, peak_rss, post_json, wait_for

LIMIT_MB = 1  # the server's --max-body-mb in this test
MB = 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS), indirect=True)  # every kind of chain restores alike
def test_the_server_refuses_large_and_non_json_bodies_before_reading_them(chain, tmp_path):
    """A body over the limit is refused with 413 whether its Content-Length says so (nothing of it read) or it
    comes chunked (reading stops at the limit): the server's peak memory grows by a few MB, not by the hundreds
    of MB offered. A text/csv body gets 415 (MLflow's CSV parser would answer with a stack trace). JSON requests
    are restored as by `mlflow models serve`."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        server = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "pipeline.serve",
                "-m",
                f"runs:/{chain['finetune']}/model",
                "--port",
                str(port),
                "--max-body-mb",
                str(LIMIT_MB),
            ],
            cwd=REPO,
            env=env_for(chain["dir"]),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(
            lambda: http_status(f"http://127.0.0.1:{port}/ping") == 200,
            timeout=120,
            what="the model server",
            proc=server,
            log=log,
        )
        url = f"http://127.0.0.1:{port}/invocations"
        clean, _ = demo_wave()
        status, body = post_json(url, {"dataframe_records": [{"audio": clean[:8000].tolist(), "sample_rate": 16000}]})
        assert status == 200 and len(body["predictions"][0]["audio"]) == 8000, str(body)[:300]
        peak = peak_rss(server.pid)

        declared = 512 * MB
        status, answer, sent = _send(port, f"Content-Length: {declared}", [])
        assert status == 413 and f"limit of {LIMIT_MB} MB" in answer["message"], answer
        offered = 256 * MB
        status, answer, sent = _send(port, "Transfer-Encoding: chunked", _chunks(offered))
        assert status == 413 and f"limit of {LIMIT_MB} MB" in answer["message"], answer
        assert sent < offered // 4  # the server stopped reading
        assert peak_rss(server.pid) < peak + 32 * MB  # nothing near the body sizes (512 MB, 256 MB)

        for content_type in ("text/csv", "application/vnd.apache.parquet", "text/plain"):
            request = urllib.request.Request(
                url, data=b"audio,sample_rate\n1,16000\n", headers={"Content-Type": content_type}
            )
            status, answer = _status(request)
            assert status == 415 and "application/json" in answer["message"], (content_type, answer)
            assert "Traceback" not in json.dumps(answer) and "stack_trace" not in answer

        status, body = post_json(url, {"dataframe_records": [{"audio": clean[:1600].tolist(), "sample_rate": 16000}]})
        assert status == 200 and len(body["predictions"][0]["audio"]) == 1600  # still serving
        assert "Refused a request with 413" in log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _chunks(total: int, size: int = 256 * 1024):
    """A chunked body of ``total`` bytes (the start of a JSON request, padded), as HTTP chunks."""
    data = b'{"dataframe_records": [{"audio": [' + b"0.1, " * (size // 5)
    for _ in range(total // len(data)):
        yield f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _send(port: int, header: str, chunks) -> tuple[int, dict, int]:
    """POST a JSON request's head with ``header``, then ``chunks`` until the server answers: (status, the
    answer's JSON, body bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{header}\r\n\r\n".encode()
        )
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:  # an answer is there
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the server closed the connection
                break
            sent += len(chunk)
        response = b""
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < _length(response):
            part = sock.recv(65536)
            if not part:
                break
            response += part
    head, _, content = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content), sent


def _length(response: bytes) -> int:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":")[1]) for line in head.splitlines() if line.startswith("content-length:")), 0)


def _status(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
