"""A team's tracking server on one machine, to try the deployment of docs/team-server.md and to test
against it: PostgreSQL (a throwaway cluster run as a non-root user, from Debian's `postgresql`
server binaries) as the backend store and the auth database, an S3 endpoint (a moto server; use
MinIO or AWS for real work), and `mlflow server` with MLflow's basic-auth app and artifacts proxied
to ``s3://<bucket>``, with one user per person.

    python -m pipeline.ops.teamserver --dir /tmp/team --user alice:alice-pw --user bob:bob-pw [--direct]

prints what a trainer exports (``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``)
and serves until Ctrl-C. With proxied artifacts (the default), trainers need no AWS credentials: only
the server talks to S3. With ``--direct`` the server only records where artifacts are
(``--default-artifact-root s3://<bucket> --no-serve-artifacts``) and each trainer reads and writes the
bucket itself, with its own AWS variables.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.ops.localserver import TrackingServer, free_port

log = logging.getLogger(__name__)

ADMIN = "admin"


class Postgres:
    """A throwaway PostgreSQL cluster on loopback with password authentication."""

    def __init__(self, password: str):
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bindirs:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        # its own folder under /tmp: the server's user must reach it (a pytest or home folder may be private)
        self.bindir, self.root, self.password = bindirs[-1], Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp")), password
        self.data, self.port = self.root / "data", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # it refuses root

    def _pg(self, *cmd: str) -> None:
        done = subprocess.run(
            self.as_user + list(cmd),
            capture_output=True,
            text=True,
            cwd=self.root,
            env={**os.environ, "PGPASSWORD": self.password},
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._pg(
            f"{self.bindir}/initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
        )
        pwfile.unlink()
        self.resume()

    def create_database(self, name: str) -> str:
        self._pg(f"{self.bindir}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.pause()
        shutil.rmtree(self.root, ignore_errors=True)

    def pause(self) -> None:
        """Stop the server at once (an outage); ``resume`` starts it again with the same data."""
        subprocess.run(
            self.as_user + [f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            cwd=self.root,
        )

    def resume(self) -> None:
        self._pg(
            f"{self.bindir}/pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.root}",
            "start",
        )


class MotoS3:
    """A moto S3 server over HTTP on loopback; its objects live in this process and survive a restart."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


class TeamServer(TrackingServer):
    """PostgreSQL + S3 + ``mlflow server --app-name basic-auth`` with artifacts in s3://<bucket>, proxied by
    the server, or with ``direct=True`` read and written by the trainers themselves."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        bucket: str = "mlflow",
        s3_endpoint: str | None = None,
        direct: bool = False,
    ):
        super().__init__(workdir)
        self.users, self.bucket, self.direct = dict(users), bucket, direct
        self.admin_password = secrets.token_urlsafe(12)
        self.flask_secret = secrets.token_urlsafe(24)  # CSRF protection of the auth app; the same across restarts
        self.postgres = Postgres(secrets.token_urlsafe(12))
        self.s3 = None if s3_endpoint else MotoS3()
        self.s3_endpoint = s3_endpoint or self.s3.endpoint
        self.aws = {
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", f"AKIA{secrets.token_hex(8).upper()}"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(24)),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }
        self.backend_uri = self.auth_uri = ""

    def start_all(self) -> None:
        """PostgreSQL, the S3 endpoint and its bucket, the server, then one user per person."""
        import boto3

        self.postgres.start()
        self.backend_uri = self.postgres.create_database("mlflow")
        self.auth_uri = self.postgres.create_database("mlflow_auth")
        if self.s3 is not None:
            self.s3.start()
            s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_kwargs(self.aws))
            s3.create_bucket(Bucket=self.bucket)
        (Path(self.workdir) / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.auth_uri}\nadmin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # a password is checked (PBKDF2, costly on purpose) once a minute per user, not at every request
            "auth_cache_ttl_seconds = 60\n"
        )
        self.start()
        with self.as_admin() as auth:
            for user, password in self.users.items():
                auth.create_user(user, password)

    def server_command(self) -> list[str]:
        artifacts = (
            ["--default-artifact-root", f"s3://{self.bucket}", "--no-serve-artifacts"]
            if self.direct
            else ["--artifacts-destination", f"s3://{self.bucket}"]
        )
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            *artifacts,
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def server_env(self) -> dict[str, str]:
        return {
            **super().server_env(),
            **self.aws,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_AUTH_CONFIG_PATH": str(Path(self.workdir) / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret,
        }

    @contextmanager
    def as_admin(self):
        """MLflow's basic-auth client, with the admin's credentials while the block runs (it reads them
        from the environment at each request)."""
        from mlflow.server import get_app_client

        keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        saved = {key: os.environ.get(key) for key in keys}
        os.environ.update(dict(zip(keys, (ADMIN, self.admin_password))))
        try:
            yield get_app_client("basic-auth", tracking_uri=self.uri)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def trainer_env(self, user: str) -> dict[str, str]:
        """What a trainer exports to work as ``user`` (with direct access, the bucket's keys and endpoint too;
        in real use each person has their own keys)."""
        env = {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.users[user],
        }
        if self.direct:
            env.update(self.aws, MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint)
        return env

    def secrets(self) -> list[str]:
        """Every secret of the deployment (for scans: none may end up in a run)."""
        return [
            self.admin_password,
            self.flask_secret,
            self.postgres.password,
            self.aws["AWS_SECRET_ACCESS_KEY"],
            self.aws["AWS_ACCESS_KEY_ID"],
            *self.users.values(),
        ]

    def stop_all(self) -> None:
        self.stop()
        if self.s3 is not None:
            self.s3.stop()
        self.postgres.stop()


def _boto_kwargs(aws: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
        "region_name": aws["AWS_DEFAULT_REGION"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where the database, logs and auth config go")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="one per person")
    parser.add_argument("--bucket", default="mlflow")
    parser.add_argument("--s3-endpoint", help="MinIO or another S3 endpoint (default: a moto server)")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="trainers read and write the bucket themselves (the server does not proxy artifacts)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    users = dict(item.split(":", 1) for item in args.user)
    server = TeamServer(Path(args.dir), users, args.bucket, args.s3_endpoint, args.direct)
    server.start_all()
    try:
        access = "read and written by each trainer" if args.direct else "proxied by the server"
        lines = [
            f"Team server at {server.uri} (backend: PostgreSQL, artifacts: s3://{args.bucket} via "
            f"{server.s3_endpoint}, {access}). A trainer exports:"
        ]
        for user in users:
            lines += [f"  # {user}"] + [f"  export {key}={value}" for key, value in server.trainer_env(user).items()]
        lines.append(f"Admin: {ADMIN} / {server.admin_password} (MLflow UI: {server.uri}). Ctrl-C stops everything.")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop_all()


if __name__ == "__main__":
    main()
