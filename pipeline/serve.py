"""`sunlearn serve`: a local Prefect server, the work pool, the deployments of prefect.yaml and one worker.

Each process it starts runs in its own session (process group). Stopping signals those groups and every flow-run
process their members spawned (a flow run gets a session of its own), and nothing else. With `db="postgres"` it
also runs a PostgreSQL cluster from Debian's packages in the serve home: the database a team's shared server uses.
With `auth` the server takes only requests that carry the auth string kept in the serve home (mode 0600); without it
the server must listen on loopback only, since anyone who reaches it can run code on its workers.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

from stages.environment import LOOPBACK, REPO, free_port

PREFECT_FILE = REPO / "prefect.yaml"
AUTH_FILE = "auth_string"  # in the serve home


class ServeError(RuntimeError):
    """A process of the stack failed to start or a step timed out."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def is_loopback(host: str) -> bool:
    """Does every address `host` names belong to this machine alone (127.0.0.0/8, ::1)?"""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def auth_string(path: Path) -> str:
    """The server's auth string in `path`: made once (`sunlearn:` + 32 random bytes), readable by its owner only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # mode 0600 from the moment the file exists: the secret is never readable by others
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"sunlearn:{secrets.token_urlsafe(32)}\n")
    if path.stat().st_mode & 0o077:
        raise ServeError(f"{path} can be read by other users: chmod 600 {path}")
    value = path.read_text().strip()
    if not value:
        raise ServeError(f"{path} is empty: remove it to generate a new auth string")
    return value


def pool_name(prefect_file: Path = PREFECT_FILE) -> str:
    """The work pool every deployment in prefect.yaml targets."""
    spec = yaml.safe_load(prefect_file.read_text())
    names = {d["work_pool"]["name"] for d in spec["deployments"]}
    if len(names) != 1:
        raise ServeError(f"{prefect_file}: expected one work pool, found {sorted(names)}")
    return names.pop()


def deployment_names(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """`flow-name/deployment-name` for each deployment, as the API and `prefect deployment run` spell them."""
    flow_names = {"pipeline_flow": "sunlearn-pipeline", "stage_flow": "sunlearn-stage", "sweep_flow": "sunlearn-sweep"}
    spec = yaml.safe_load(prefect_file.read_text())
    return [f"{flow_names[d['entrypoint'].rpartition(':')[2]]}/{d['name']}" for d in spec["deployments"]]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ProcessGroup:
    """Processes started in their own sessions, with logs in `log_dir`; `stop()` ends them and their descendants."""

    log_dir: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def run(self, name: str, cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> None:
        """Run a command to completion; on failure or timeout raise with the end of its log."""
        proc = self.start(name, cmd, env, cwd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._end(proc, grace=5)
            raise ServeError(f"{name} timed out after {timeout:.0f}s:\n{_tail(self.log_dir / f'{name}.log')}") from None
        finally:
            self.started.remove((name, proc))
        if code != 0:
            raise ServeError(f"{name} failed (exit {code}):\n{_tail(self.log_dir / f'{name}.log')}")

    def check_alive(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                raise ServeError(f"{name} exited ({proc.returncode}):\n{_tail(self.log_dir / f'{name}.log')}")

    def pids(self) -> set[int]:
        """Every live process started here, with all of its descendants."""
        out = set()
        for _, proc in self.started:
            try:
                parent = psutil.Process(proc.pid)
                out |= {parent.pid, *(c.pid for c in parent.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self, grace: float = 20) -> None:
        """End everything started here, last started first (the worker before the server before the database)."""
        while self.started:
            _, proc = self.started.pop()
            self._end(proc, grace)

    @staticmethod
    def _end(proc: subprocess.Popen, grace: float) -> None:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        # SIGINT twice: a Prefect worker takes the first one as "finish up" and only exits on the second
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            _signal_group(proc.pid, sig)
            try:
                proc.wait(timeout=grace / 3)
                break
            except subprocess.TimeoutExpired:
                continue
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        # flow runs live in sessions of their own: end the ones that outlived their worker
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(check, timeout: float, what: str, procs: ProcessGroup | None = None, every: float = 0.5) -> None:
    """Poll `check()` until it is true; fail after `timeout` seconds or as soon as a started process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if procs is not None:
            procs.check_alive()
        time.sleep(every)
    raise ServeError(f"timed out after {timeout:.0f}s waiting for {what}")


def postgres_bin() -> Path:
    """The bin folder of the newest PostgreSQL from Debian's packages (`apt-get install postgresql`)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ServeError("PostgreSQL is not installed: run `apt-get install postgresql` (or `make serve DB=postgres`)")
    return Path(initdb).resolve().parent


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # the server refuses to run as root; Debian's package creates the `postgres` account
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in `data_dir`, listening on loopback only, with a `prefect` database (trust auth)."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{LOOPBACK}:{self.port}/prefect"

    def start(self, procs: ProcessGroup, timeout: float = 60) -> None:
        bindir = postgres_bin()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postgres", "postgres")
            self.data_dir.chmod(0o700)
            if subprocess.run(_as_postgres_user(["test", "-w", str(self.data_dir)]), timeout=10).returncode != 0:
                raise ServeError(f"the postgres user cannot reach {self.data_dir}: use a --home it can traverse")
        env = {**os.environ, "LC_ALL": "C"}
        if not (self.data_dir / "PG_VERSION").exists():
            procs.run("initdb", _as_postgres_user([str(bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                                                   "--auth=trust", "-E", "UTF8"]), env, timeout, cwd=self.data_dir)
        procs.start("postgres", _as_postgres_user([str(bindir / "postgres"), "-D", str(self.data_dir),
                                                   "-h", LOOPBACK, "-p", str(self.port), "-k", str(self.data_dir)]),
                    env, cwd=self.data_dir)
        ready = [str(bindir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres"]
        wait_until(lambda: subprocess.run(ready, timeout=10).returncode == 0, timeout, "PostgreSQL", procs)
        exists = subprocess.run([str(bindir / "psql"), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", "-tAc",
                                 "SELECT 1 FROM pg_database WHERE datname = 'prefect'"],
                                capture_output=True, text=True, timeout=30, check=True)
        if exists.stdout.strip() != "1":
            procs.run("createdb", [str(bindir / "createdb"), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres",
                                   "prefect"], env, timeout)


@dataclass
class Stack:
    """What `serve` started: the addresses, the pool and the processes."""

    ui_url: str
    api_url: str
    pool: str
    db: str
    artifacts: str
    procs: ProcessGroup
    deployments: list[str]
    auth_file: Path | None = None  # holds the auth string every client must send; None: no auth (loopback only)
    workers: int = 1  # each takes one flow run at a time, as one per GPU node would


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


@contextmanager
def serve(
    home: Path,
    host: str = LOOPBACK,
    port: int = 4200,
    db: str = "sqlite",
    artifacts: str = "artifacts",
    prefect_file: Path = PREFECT_FILE,
    timeout: float = 180,
    auth: bool = False,
    workers: int = 1,
) -> Iterator[Stack]:
    """Start database (for postgres), server, work pool, deployments and worker(s); stop all of them on exit.

    With `workers` > 1, each worker takes one flow run at a time, as one per GPU node would on a cluster."""
    if not auth and not is_loopback(host):
        raise ServeError(f"--host {host} is reachable from other machines, and anyone who reaches the server can run "
                         "code on its workers: add --auth, or keep the default 127.0.0.1")
    home = home.expanduser().resolve()
    procs = ProcessGroup(home / "logs")
    if port == 0:
        port = free_port(host)
    elif not port_is_free(host, port):
        raise ServeError(f"port {port} on {host} is in use: pick another with --port (0 picks a free one)")
    # artifacts are resolved here: a relative root means the same folder to every flow run
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
    ui_url = f"http://{host}:{port}"
    api_url = f"{ui_url}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api_url, "SUNLEARN_REPO": str(REPO), "SUNLEARN_ARTIFACTS": artifacts}
    env.pop("PREFECT_PROFILE", None)
    auth_file = home / AUTH_FILE if auth else None
    if auth_file is not None:
        env["PREFECT_API_AUTH_STRING"] = auth_string(auth_file)  # the worker, its flow runs and the deploy step
    try:
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        # the UI in the browser calls this (not port 4200), unless it must go through a proxy
        server_env.setdefault("PREFECT_SERVER_UI_API_URL", api_url)
        if auth_file is not None:
            server_env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"]
        if db == "postgres":
            database = LocalPostgres(home / "postgres", free_port())
            database.start(procs, timeout)
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database.url
            db = f"postgres, local cluster in {database.data_dir} ({database.url})"
        elif db.startswith("postgresql"):
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = db
        elif db == "sqlite":
            db = f"sqlite ({home / 'prefect.db'})"
        else:
            raise ServeError(f"unknown database {db!r}: sqlite, postgres, or a postgresql+asyncpg:// URL")
        procs.start("server", _prefect("server", "start", "--host", host, "--port", str(port), "--analytics-off"),
                    server_env)
        wait_until(lambda: _healthy(api_url), timeout, f"the Prefect server at {api_url}", procs)
        pool = pool_name(prefect_file)
        procs.run("work-pool", _prefect("work-pool", "create", pool, "--type", "process", "--overwrite"), env, timeout)
        # the workers start while the deployments are created: both take tens of seconds
        for i in range(workers):
            name = f"sunlearn-{socket.gethostname()}" + (f"-{i + 1}" if workers > 1 else "")
            limit = ["--limit", "1"] if workers > 1 else []
            procs.start(f"worker-{i + 1}" if workers > 1 else "worker",
                        _prefect("worker", "start", "--pool", pool, "--type", "process", "--name", name, *limit), env)
        procs.run("deploy", _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)), env,
                  timeout)
        yield Stack(ui_url, api_url, pool, db, artifacts, procs, deployment_names(prefect_file), auth_file,
                    workers)
    finally:
        procs.stop()


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_forever(stack: Stack) -> None:
    """Block until Ctrl-C, SIGTERM or a started process dies."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            stack.procs.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe(stack: Stack) -> str:
    lines = [
        f"Prefect UI:   {stack.ui_url}",
        f"API:          {stack.api_url}   (export PREFECT_API_URL={stack.api_url} to use the prefect CLI)",
        f"database:     {stack.db}",
        f"work pool:    {stack.pool} (process), "
        + ("one worker" if stack.workers == 1 else f"{stack.workers} workers, one flow run each") + " on this machine",
        f"artifacts:    {stack.artifacts}",
        "deployments:  " + ", ".join(stack.deployments),
        _describe_auth(stack.auth_file),
        f"logs:         {stack.procs.log_dir}",
        "re-run one:   the deployment's page in the UI > Run > Custom run (e.g. overrides [\"masks.gamma=0.6\"])",
        f"stop:         Ctrl-C here, or kill -TERM {os.getpid()} (ends only the processes serve started)",
    ]
    return "\n".join(lines)


def _describe_auth(auth_file: Path | None) -> str:
    if auth_file is None:
        return "auth:         off (the server listens on loopback only; --auth turns it on)"
    return (f"auth:         on; the string is in {auth_file} (mode 0600). Another client or worker: "
            f'export PREFECT_API_AUTH_STRING="$(cat {auth_file})"; the UI asks for the same string')


def cmd_serve(args) -> None:
    """The `sunlearn serve` command: start everything, print where it is, wait for Ctrl-C, stop what it started."""
    home = Path(args.home) if args.home else REPO / ".cache" / "prefect"
    with serve(home, args.host, args.port, args.db, args.artifacts, auth=args.auth, workers=args.workers) as stack:
        print(describe(stack), flush=True)
        try:
            run_forever(stack)
        finally:
            # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("stopping ...", flush=True)
    print("stopped", flush=True)
