"""The team services on one machine, for a newcomer to try team mode and for the tests: PostgreSQL (a throwaway
cluster made with initdb / pg_ctl), `mlflow server` with the basic-auth app and proxied artifacts on top of it,
and an SSH server for the shared DVC remote. Everything listens on 127.0.0.1 only.

    python -m baize.team up [--dir .team]     (make team-up)   start all three, print the variables to export
    python -m baize.team down [--dir .team]   (make team-down) stop what `up` started
    python -m baize.team env [--dir .team]    print the variables again

Passwords are made up at `up` and kept in `<dir>/state.json` (mode 600, git-ignored), never in a committed file.
A team with managed services skips all this and sets the same variables (see the README, "For teams").
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from baize.errors import BaizeError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _pg_bin(name: str) -> str:
    """initdb / pg_ctl / psql: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for folder in versions:
        if (folder / name).is_file():
            return str(folder / name)
    raise BaizeError(f"{name}: not found; install PostgreSQL (Debian: apt-get install -y postgresql)")


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the `postgres` account."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.is_file() else ""
            raise BaizeError(f"{what} exited with status {proc.returncode}: {tail.strip().splitlines()[-1:] }")
        if time.monotonic() > deadline:
            raise BaizeError(f"{what} did not come up within {timeout:.0f} s" + (f" (log: {log})" if log else ""))
        time.sleep(0.3)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


@dataclass
class TeamServices:
    """Where the services of one `up` live and how to reach them (saved as `<root>/state.json`)."""

    root: Path
    pg_port: int = 0
    mlflow_port: int = 0
    ssh_port: int = 0
    pg_data: str = ""
    pg_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    admin_user: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    ssh_user: str = field(default_factory=getpass.getuser)
    mlflow_pid: int | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def remote_path(self) -> Path:
        return self.root.resolve() / "dvc-remote"

    @property
    def remote_url(self) -> str:
        return f"ssh://{HOST}:{self.ssh_port}{self.remote_path}"

    @property
    def ssh_key(self) -> Path:
        return self.root.resolve() / "ssh" / "id_ed25519"

    @property
    def database_uri(self) -> str:
        """No password: the MLflow server reads it from PGPASSWORD (libpq), so it is in no file or command line."""
        return f"postgresql://mlflow@{HOST}:{self.pg_port}/mlflow"

    def env(self) -> dict[str, str]:
        """What a team member exports (here: the admin; a team gives each member a user of their own)."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.admin_user,
            "MLFLOW_TRACKING_PASSWORD": self.admin_password,
        }

    def dvc_remote_commands(self, name: str = "team") -> list[list[str]]:
        """The remote in the committed config (address only), the user and key in `.dvc/config.local`."""
        return [
            ["dvc", "remote", "add", "-f", name, self.remote_url],
            ["dvc", "remote", "modify", "--local", name, "user", self.ssh_user],
            ["dvc", "remote", "modify", "--local", name, "keyfile", str(self.ssh_key)],
        ]

    # ------------------------------------------------------------------ state

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "state.json"
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)

    @classmethod
    def load(cls, root: Path) -> TeamServices:
        path = Path(root) / "state.json"
        if not path.is_file():
            raise BaizeError(f"{path}: no team services here (run `make team-up` first)")
        data = json.loads(path.read_text())
        data["root"] = Path(data["root"])
        return cls(**data)

    # ------------------------------------------------------------------ PostgreSQL

    def start_postgres(self) -> None:
        if not self.pg_port:
            self.pg_port = free_port()
        if not self.pg_data:
            # As root the cluster belongs to `postgres`, which must reach it: a folder of its own under /tmp
            # (a pytest or home folder above it may be closed to other users).
            if os.geteuid() == 0:
                self.pg_data = tempfile.mkdtemp(prefix="baize-team-pg-")
                shutil.chown(self.pg_data, "postgres", "postgres")
            else:
                self.pg_data = str((self.root / "pg").resolve())
                Path(self.pg_data).mkdir(parents=True, exist_ok=True)
        data = Path(self.pg_data) / "data"
        if not (data / "PG_VERSION").is_file():
            pwfile = Path(self.pg_data) / "pw"  # initdb reads the superuser's password from a file; removed after
            pwfile.write_text(secrets.token_urlsafe(18) + "\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            try:
                subprocess.run(
                    _as_pg_user([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                                 "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]),
                    check=True, capture_output=True, text=True,
                )
            except subprocess.CalledProcessError as exc:
                raise BaizeError(f"initdb failed: {exc.stderr.strip().splitlines()[-1:]}") from None
            finally:
                pwfile.unlink(missing_ok=True)
            created = True
        else:
            created = False
        self.pg_ctl("start")
        if created:
            # The password goes through psql's standard input: no command line shows it.
            self.psql(f"CREATE ROLE mlflow LOGIN PASSWORD '{self.pg_password}';\n"
                      "CREATE DATABASE mlflow OWNER mlflow;\nCREATE DATABASE mlflow_auth OWNER mlflow;\n")

    def pg_ctl(self, action: str) -> None:
        data = Path(self.pg_data) / "data"
        cmd = [_pg_bin("pg_ctl"), "-D", str(data), "-w", "-t", "60", "-m", "fast"]
        if action in ("start", "restart"):
            cmd += ["-l", str(Path(self.pg_data) / "postgres.log"),
                    "-o", f"-p {self.pg_port} -c listen_addresses={HOST} -k {data}"]
        proc = subprocess.run(_as_pg_user([*cmd, action]), capture_output=True, text=True)
        if proc.returncode != 0 and action != "stop":
            raise BaizeError(f"pg_ctl {action} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")

    def psql(self, sql: str, db: str = "postgres") -> None:
        data = Path(self.pg_data) / "data"
        subprocess.run(
            _as_pg_user([_pg_bin("psql"), "-h", str(data), "-p", str(self.pg_port), "-U", "postgres", "-d", db,
                         "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"]),
            input=sql, check=True, capture_output=True, text=True,
        )

    # ------------------------------------------------------------------ MLflow

    def start_mlflow(self, timeout: float = 180) -> None:
        if not self.mlflow_port:
            self.mlflow_port = free_port()
        root = self.root.resolve()
        (root / "mlflow-artifacts").mkdir(parents=True, exist_ok=True)
        ini = root / "basic_auth.ini"  # no secret in it: the passwords come from the environment below
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = postgresql://mlflow@{HOST}:{self.pg_port}/mlflow_auth\n"
            f"admin_username = {self.admin_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = {
            **os.environ,
            "PGPASSWORD": self.pg_password,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(key, None)
        log = root / "mlflow-server.log"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_cli) if mlflow_cli.is_file() else "mlflow", "server", "--app-name", "basic-auth",
               "--backend-store-uri", self.database_uri, "--serve-artifacts",
               "--artifacts-destination", str(root / "mlflow-artifacts"),
               "--host", HOST, "--port", str(self.mlflow_port), "--workers", "2"]
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=root, start_new_session=True)
        self.mlflow_pid = proc.pid
        self.save()
        _wait("mlflow server", lambda: _http_ok(f"{self.tracking_uri}/health"), timeout, proc, log)

    def stop_mlflow(self) -> None:
        if self.mlflow_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow_pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _port_open(self.mlflow_port):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # reap it when it is our child (no zombie left behind)
                try:
                    if os.waitpid(self.mlflow_pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)
            self.mlflow_pid = None

    # ------------------------------------------------------------------ SSH (the DVC remote)

    def start_sshd(self, timeout: float = 30) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).is_file():
            raise BaizeError("sshd: not found; install OpenSSH's server (Debian: apt-get install -y openssh-server)")
        if not self.ssh_port:
            self.ssh_port = free_port()
        folder = self.root.resolve() / "ssh"
        folder.mkdir(parents=True, exist_ok=True)
        self.remote_path.mkdir(parents=True, exist_ok=True)
        for key in (folder / "host_ed25519", self.ssh_key):
            if not key.is_file():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "baize-team", "-f", str(key)],
                               check=True, capture_output=True)
        shutil.copy(self.ssh_key.with_suffix(".pub"), folder / "authorized_keys")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        config = folder / "sshd_config"
        config.write_text(
            f"Port {self.ssh_port}\nListenAddress {HOST}\nHostKey {folder / 'host_ed25519'}\n"
            f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
            f"AllowUsers {self.ssh_user}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\n"
        )
        subprocess.run([sshd, "-f", str(config), "-E", str(folder / "sshd.log")], check=True, capture_output=True)
        _wait("sshd", lambda: _port_open(self.ssh_port), timeout, log=folder / "sshd.log")

    def stop_sshd(self) -> None:
        pidfile = self.root.resolve() / "ssh" / "sshd.pid"
        if pidfile.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            pidfile.unlink(missing_ok=True)

    # ------------------------------------------------------------------ all together

    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.start_postgres()
            self.save()
            self.start_mlflow()
            self.start_sshd()
        except BaseException:
            self.down()
            raise
        self.save()

    def down(self, remove: bool = False) -> None:
        self.stop_sshd()
        self.stop_mlflow()
        if self.pg_data and (Path(self.pg_data) / "data" / "postmaster.pid").is_file():
            self.pg_ctl("stop")
        if remove:
            if self.pg_data and Path(self.pg_data).resolve() != self.root.resolve():
                shutil.rmtree(self.pg_data, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.save()


def add_user(tracking_uri: str, username: str, password: str, *, experiments: dict[str, str] | None = None,
             models: dict[str, str] | None = None) -> None:
    """An admin (MLFLOW_TRACKING_USERNAME / _PASSWORD in the environment) adds a member and grants permissions
    (READ, EDIT, MANAGE, NO_PERMISSIONS) on experiments and registered models by name; others get the server's
    default_permission (READ here). An experiment or model that does not exist yet is created empty first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        auth.create_user(username, password)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise BaizeError(f"cannot create user {username!r}: {str(exc).splitlines()[0][:200]}") from None
    for name, permission in (experiments or {}).items():
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        try:
            auth.create_experiment_permission(exp_id, username, permission)
        except MlflowException:
            auth.update_experiment_permission(exp_id, username, permission)
    for name, permission in (models or {}).items():
        with contextlib.suppress(MlflowException):
            client.create_registered_model(name)
        try:
            auth.create_registered_model_permission(name, username, permission)
        except MlflowException:
            auth.update_registered_model_permission(name, username, permission)


def _print_env(services: TeamServices) -> None:
    print(f"PostgreSQL     {HOST}:{services.pg_port}  (databases mlflow, mlflow_auth; data in {services.pg_data})")
    print(f"MLflow server  {services.tracking_uri}  (basic auth; artifacts proxied, stored in "
          f"{services.root.resolve() / 'mlflow-artifacts'})")
    print(f"DVC remote     {services.remote_url}  (sshd for user {services.ssh_user}, key {services.ssh_key})")
    print("\n# export these (the admin user; `python -m baize.team add-user NAME --experiment baize=EDIT ...`"
          " makes one per member):")
    for key, value in services.env().items():
        print(f"export {key}={value}")
    print("\n# the shared DVC remote (address in .dvc/config, user and key only in the git-ignored config.local):")
    for cmd in services.dvc_remote_commands():
        print(" ".join(cmd))
    print("dvc remote default team")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m baize.team", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "env", "add-user"])
    parser.add_argument("username", nargs="?", help="add-user: the new member (password from BAIZE_NEW_PASSWORD "
                        "or asked; 12 characters at least)")
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME=PERMISSION")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PERMISSION")
    parser.add_argument("--dir", default=".team", type=Path, help="state folder (git-ignored)")
    parser.add_argument("--remove", action="store_true", help="down: also delete the data (database, remote)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            if (args.dir / "state.json").is_file():
                services = TeamServices.load(args.dir)
                services.down()
            else:
                services = TeamServices(root=args.dir)
            services.up()
            _print_env(services)
        elif args.action == "add-user":
            if not args.username:
                parser.error("add-user needs a USERNAME")
            password = os.environ.get("BAIZE_NEW_PASSWORD") or getpass.getpass(f"password for {args.username}: ")
            uri = os.environ.get("MLFLOW_TRACKING_URI") or TeamServices.load(args.dir).tracking_uri
            add_user(uri, args.username, password,
                     experiments=dict(e.split("=", 1) for e in args.experiment),
                     models=dict(m.split("=", 1) for m in args.model))
            print(f"user {args.username} added on {uri}")
        elif args.action == "env":
            _print_env(TeamServices.load(args.dir))
        else:
            TeamServices.load(args.dir).down(remove=args.remove)
            print(f"team services stopped ({'data removed' if args.remove else f'data kept in {args.dir}'})")
    except BaizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
