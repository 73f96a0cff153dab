"""Container runtimes: run a task's commands inside its ``image``.

Sisyphus's three path levels: a *remote* input is staged to a *local* path
under the attempt's work directory, which is bind-mounted at the *internal*
path the command names. Only the declared inputs and outputs (and redirect
targets that are neither) are mounted; the network is off (``--network none``)
and the container is removed when the command ends (``--rm``).

Each command runs in its own container with a unique ``--name``, so that a
timeout or cancel can kill and remove exactly that container: killing the
runtime's client alone would leave the container running under conmon.
Redirections are done on the host side (the client's stdin/stdout/stderr are
the local files), so a redirect works even when its target is not mounted.

One interface, :class:`ContainerRuntime`; one implementation, the
``podman``/``docker`` command line; :data:`RUNTIMES` maps the settings' name to it.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocol.settings import WorkerSettings
from worker.errors import ContainerError

# exit statuses by which podman and docker report their own failures, not the command's
RUNTIME_STATUSES = {
    125: "the container runtime failed (image missing or not pullable, bad option)",
    126: "the program exists in the image but cannot be executed",
    127: "the program was not found in the image",
}
_CLI_TIMEOUT = 60.0  # seconds for a kill / rm / version call


@dataclass(frozen=True)
class Mount:
    """A bind mount: local ``source`` (must exist) at ``target`` inside the container."""

    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """How to run one command in a container."""

    image: str
    name: str
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    interactive: bool = False  # keep stdin open (the command's stdin is redirected)


def container_name(attempt_id: int, index: int) -> str:
    """A name unique to one command of one attempt (a retry gets a new one)."""
    return f"ecloud-{attempt_id}-{index}-{uuid.uuid4().hex[:8]}"


class ContainerRuntime(ABC):
    """What the worker needs from a container engine."""

    name: str

    @abstractmethod
    def check(self) -> None:
        """Raise ContainerError, saying what to install, when the runtime is unusable."""

    @abstractmethod
    def run_argv(self, spec: ContainerSpec, argv: Sequence[str]) -> list[str]:
        """The host command that runs ``argv`` in a new container and waits for it."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Kill and remove a container; no error when it is already gone."""

    def explain(self, status: int) -> str | None:
        """A reason for an exit status that comes from the runtime, not the command."""
        return RUNTIME_STATUSES.get(status)


class CliRuntime(ContainerRuntime):
    """podman or docker driven through its command line.

    ``global_args`` go before the subcommand (podman's ``--runtime runc``),
    ``run_args`` after ``run`` (docker's ``--runtime``), ``rm_args`` after
    ``rm --force`` (podman's ``--time 0``).
    """

    def __init__(self, executable: str, *, global_args: Sequence[str] = (),
                 run_args: Sequence[str] = (), rm_args: Sequence[str] = ()) -> None:
        self.name = executable
        self.executable = executable
        self.global_args = list(global_args)
        self.run_args = list(run_args)
        self.rm_args = list(rm_args)

    def check(self) -> None:
        if shutil.which(self.executable) is None:
            raise ContainerError(
                f"the task has an 'image' but {self.executable!r} is not installed on this "
                f"worker: install it (apt-get install {self.executable}) or set "
                "[worker] container_runtime")

    def run_argv(self, spec: ContainerSpec, argv: Sequence[str]) -> list[str]:
        cmd = [self.executable, *self.global_args, "run", *self.run_args, "--rm",
               "--network", "none", "--name", spec.name]
        if spec.interactive:
            cmd.append("--interactive")
        # parents before children, so a mount inside another mount stays visible
        for mount in sorted(spec.mounts, key=lambda m: (m.target.count("/"), m.target)):
            for part, what in ((str(mount.source), "local path"), (mount.target, "internal path")):
                if "," in part:
                    raise ContainerError(f"{what} {part!r} contains ',', which a --mount option "
                                         "cannot express; rename it")
            option = f"type=bind,source={mount.source},destination={mount.target}"
            cmd += ["--mount", option + (",ro" if mount.read_only else "")]
        for key, value in spec.env.items():
            cmd += ["--env", f"{key}={value}"]
        return [*cmd, spec.image, *argv]

    def remove(self, name: str) -> None:
        # kill first: `rm --force` alone waits for a graceful stop (10 s by default).
        # The kill misses a container that is still being created; podman's rm then
        # needs --time 0, else it gives that container the same 10 s.
        for sub in (["kill", name], ["rm", "--force", *self.rm_args, name]):
            try:
                subprocess.run([self.executable, *self.global_args, *sub], capture_output=True,
                               timeout=_CLI_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass  # best effort: the container may already be gone


RUNTIMES: dict[str, Callable[[Sequence[str]], ContainerRuntime]] = {
    "podman": lambda extra: CliRuntime("podman", global_args=extra, rm_args=["--time", "0"]),
    "docker": lambda extra: CliRuntime("docker", run_args=extra),
}
"""Runtime name (``[worker] container_runtime``) -> factory taking ``container_args``."""


def runtime_for(settings: WorkerSettings) -> ContainerRuntime:
    """The container runtime the settings name."""
    try:
        factory = RUNTIMES[settings.container_runtime]
    except KeyError:
        raise ContainerError(f"[worker] container_runtime {settings.container_runtime!r} is "
                             f"not one of {', '.join(sorted(RUNTIMES))}") from None
    return factory(settings.container_args)
