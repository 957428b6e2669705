"""What the benchmark scripts share: a mosquitto broker, processes, polling, output.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on
``sys.path``; they import this module as ``_support``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_agent.protocol import MOSQUITTO_ACL

# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tool(name: str) -> str:
    """Path of a mosquitto executable."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if path is None:
        raise SystemExit(f"{name} is not installed (apt-get install mosquitto)")
    return path


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is truthy, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- memory


def proc_memory_kib(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process, in KiB, from ``/proc/<pid>/status``."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def ready_process_memory(script: str, args: Iterable[str], what: str) -> dict[str, int]:
    """:func:`proc_memory_kib` of ``python -c script *args`` once it prints ``ready``.

    The script prints ``ready`` when it has loaded what is measured, then waits for its
    stdin to close; the process is stopped afterwards whatever happened. A first line
    other than ``ready`` raises ``RuntimeError`` naming ``what`` failed.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{what} failed (said {line!r})")
        return proc_memory_kib(process.pid)
    finally:
        if process.stdin is not None:
            with suppress(OSError):
                process.stdin.close()
        stop_process(process)


# --------------------------------------------------------------------------- mosquitto


def password(user: str) -> str:
    """The password of ``user`` on a :func:`mosquitto` broker with users."""
    return f"pw-{user}"


def _auth_config(directory: Path, users: Iterable[str] | None) -> str:
    """mosquitto.conf lines for anonymous access, or the shipped ACL and passwords."""
    if users is None:
        return "allow_anonymous true\n"
    passwords = directory / "passwd"
    passwords.write_text("")
    for user in users:
        subprocess.run(
            [tool("mosquitto_passwd"), "-b", str(passwords), user, password(user)],
            check=True,
            capture_output=True,
        )
    passwords.chmod(0o600)
    acl = directory / "acl"
    acl.write_text(MOSQUITTO_ACL)
    return f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n"


FLEET_QUEUE = "max_queued_messages 100000\n"
"""The coordinator's one subscription hears every device: mosquitto's default queue of
1,000 messages per client overflows (and drops) when a thousand agents report at once."""


@contextmanager
def mosquitto(
    directory: Path,
    *,
    users: Iterable[str] | None = None,
    sys_interval: int | None = None,
    timeout: float,
) -> Iterator[int]:
    """A mosquitto broker on a loopback port, persistence off; yields the port.

    Args:
        directory: where its config, password file, ACL and log go (created).
        users: ``None`` for anonymous access without an ACL; otherwise only these users,
            with the passwords of :func:`password`, under the shipped ACL.
        sys_interval: seconds between ``$SYS`` updates (mosquitto's default if ``None``).
        timeout: seconds to wait for it to listen.
    """
    directory.mkdir(parents=True, exist_ok=True)
    auth = _auth_config(directory, users)
    port = free_port()
    config = directory / "mosquitto.conf"
    sys_line = f"sys_interval {sys_interval}\n" if sys_interval is not None else ""
    # As root, mosquitto would switch to the 'mosquitto' user, who cannot read directory.
    run_as = "user root\n" if os.geteuid() == 0 else ""
    config.write_text(
        f"listener {port} 127.0.0.1\n{auth}persistence false\n{FLEET_QUEUE}{sys_line}{run_as}"
    )
    log = directory / "mosquitto.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [tool("mosquitto"), "-c", str(config)], stdout=sink, stderr=subprocess.STDOUT
        )
    try:

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_until(listening, timeout, "mosquitto to listen")
        yield port
    finally:
        stop_process(process)


# --------------------------------------------------------------------------- output


def argument_parser(doc: str | None, default_out: Path) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--out`` (the JSON path)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--out", type=Path, default=default_out, help="JSON output path")
    return parser


def version_of(package: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """The Python version and the machine."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def mosquitto_version() -> str:
    """First line of ``mosquitto -h`` (its version)."""
    out = subprocess.run([tool("mosquitto"), "-h"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def environment(packages: Iterable[str]) -> dict[str, Any]:
    """What broker figures were measured on, and how they were produced."""
    return {
        "command": shlex.join(sys.orig_argv),
        "timestamp": timestamp(),
        **machine_info(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "packages": {name: version_of(name) for name in packages},
        "mosquitto": mosquitto_version(),
    }


def load_text(env: dict[str, Any]) -> str:
    """The load averages of an :func:`environment`, for a docs line (the machine may be
    shared, and timings move with its load)."""
    one, five, fifteen = env["loadavg_1_5_15"]
    return f"load average {one}, {five}, {fifteen} when it finished"


def repository_path(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON (creating the directory) and say so on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
"""The page every benchmark script writes its section into."""

DOC_TITLE = (
    "# Benchmarks\n\nFigures measured by the scripts in `benchmarks/` "
    "(see `benchmarks/README.md`).\n"
)


def write_doc_section(path: Path, section: str) -> None:
    """Put ``section`` into ``path``, replacing the section with the same heading only.

    A section runs from its heading (the first line of ``section``, a ``## `` line) up
    to the next ``# ``/``## `` heading; a section whose heading is not there yet is
    appended (a missing file is created with a title). Every script writes only its own
    sections, so running one keeps the others' figures.
    """
    heading, _, _ = section.partition("\n")
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with a '## ' heading, not {heading!r}")
    lines = (path.read_text() if path.exists() else DOC_TITLE).splitlines()
    new = section.strip("\n").splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))),
            len(lines),
        )
        rest = lines[end:]
        lines = [*lines[:start], *new, *(["", *rest] if rest else [])]
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines = [*lines, "", *new]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {heading[3:]!r} in {path}", file=sys.stderr)
