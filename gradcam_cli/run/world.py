"""torchrun: this process's rank, the messages between ranks, and sharding (the coordinator's transport).

`torchrun --nproc-per-node N [--nnodes M ...] -m gradcam_cli explain ...` starts one process (a rank) per GPU
or CPU share, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment. Then:

- every rank joins torch.distributed (gloo for CPU, nccl for CUDA; `--device cuda` means LOCAL_RANK's GPU),
  loads the model and probes it; if any rank cannot start, every rank stops and rank 0 says why, once;
- rank 0 lists the inputs (and, with --resume, works out what is left) and hands the list to the others;
- each rank takes whole batches of that list round robin (batch j goes to rank j mod N): the shares are
  disjoint, deterministic and equal to within one batch, and every image is explained in exactly the batch
  it has in a one-process run, so the results are the same bit for bit;
- each rank writes its own images' files and `predictions.rank<k>.csv`; no two ranks write one file;
- at the end every rank reports to rank 0, which merges the rank CSVs into predictions.csv in input order
  and writes one run.json with per-rank counts and throughput.

The ranks talk only through the key-value store torchrun already runs (the c10d store): small JSON messages,
never collectives on tensors. Each rank keeps a heartbeat there, and a rank waiting for another gives up only
when the other's heartbeat has stopped for `dist_timeout` seconds: a slow rank is waited for, a dead one is
not. The surviving ranks then stop with a clear message and exit code 4, keeping what was written, and
`--resume` explains only what is missing.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) a `World` is rank 0 of 1 and every
method is a no-op. torch is imported only when a distributed run starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from gradcam_cli.errors import ExitCode, GradcamError, MachineFault, RunStopped, exit_code_of, one_line

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 120.0
HEARTBEAT_S = 1.0

_calls = 0  # explain() calls in this process: keeps the store keys of one call apart from the next


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun). No torch import: the CLI asks before anything loads."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """RANK as torchrun sets it (0 without torchrun)."""
    if env_world_size() <= 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def shard(items: Sequence[T], rank: int, world_size: int, batch_size: int) -> list[T]:
    """Rank `rank`'s share: whole batches of `batch_size`, dealt round robin (batch j -> rank j mod world_size).

    Disjoint and complete over the ranks, the same in every process, and each image keeps the batch it has in
    a one-process run (same neighbours, same batch size), so per-image results do not depend on world size.
    """
    if world_size <= 1:
        return list(items)
    step = world_size * batch_size
    return [item for start in range(rank * batch_size, len(items), step) for item in items[start : start + batch_size]]


class World:
    """This process's place in a torchrun job: rank, world size, local rank, and the messages between ranks.

    `World()` is a one-process run; `World.from_env()` reads torchrun's environment. Use `with world.joined(
    device)` around the run: it joins torch.distributed, starts the heartbeat and turns SIGTERM (what torchrun
    sends every rank when one fails) into a `RunStopped` exception, so what was written is flushed and kept.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not 0 <= rank < size:
            raise GradcamError(f"RANK {rank} is not between 0 and WORLD_SIZE-1 ({size - 1})")
        self.rank, self.size, self.local_rank, self.timeout = rank, size, local_rank, float(timeout)
        self.beat_every = min(HEARTBEAT_S, self.timeout / 4)  # several beats inside every timeout
        self.backend: str | None = None
        self.store: Any = None
        self._owns_group = False
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None
        self._agreed = False
        self._ignoring = False
        self.stop_reason: str | None = None

    @classmethod
    def from_env(cls, timeout: float = DEFAULT_TIMEOUT_S) -> World:
        """torchrun's variables; or, for the Python API inside a job that initialised torch.distributed itself
        (without them), that process group's rank and size."""
        size = env_world_size()
        dist = sys.modules.get("torch.distributed")  # not imported: nobody can have initialised it
        if "WORLD_SIZE" not in os.environ and dist is not None and dist.is_available() and dist.is_initialized():
            local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, timeout)
        if size <= 1:
            return cls(timeout=timeout)
        try:
            rank = int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise GradcamError(
                f"WORLD_SIZE is {size} but RANK/LOCAL_RANK are missing or not integers; "
                "start distributed runs with torchrun (torchrun --nproc-per-node N -m gradcam_cli explain ...)"
            ) from None
        return cls(rank, size, local_rank, timeout)

    # --- who am I -----------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """More than one rank: sharding, rank CSVs and the merge apply."""
        return self.size > 1

    def pick_device(self, spec: str) -> str:
        """`cuda` (and `auto` on a CUDA machine) mean LOCAL_RANK's GPU in a distributed run, which also becomes
        the current CUDA device; an explicit `cuda:N` is kept as given."""
        if not self.active:
            return spec
        import torch

        if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count and self.local_rank >= count:
                raise GradcamError(
                    f"--device {spec}: LOCAL_RANK {self.local_rank} has no GPU, this node has {count} CUDA "
                    f"device(s); start at most {count} processes per node (torchrun --nproc-per-node {count})"
                )
            if not count:
                return spec  # resolve_device says CUDA is not there
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return spec

    def shard(self, items: Sequence[T], batch_size: int) -> list[T]:
        return shard(items, self.rank, self.size, batch_size)

    def describe(self) -> dict[str, Any]:
        """For run.json."""
        return {
            "world_size": self.size,
            "backend": self.backend,
            "sharding": "whole batches of batch_size dealt round robin: batch j of the inputs -> rank j mod world_size",
            "timeout_seconds": self.timeout,
            "master": f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}",
        }

    # --- joining and leaving --------------------------------------------------------------------------------

    @contextmanager
    def joined(self, device_spec: str) -> Iterator[World]:
        """Join the process group for the duration of a run (no-op for one process).

        SIGTERM raises `RunStopped` while the run goes on. Once this rank's part is over (rank 0 has its
        results, or rank 0 has merged), SIGTERM is ignored and stays ignored after leaving: torchrun sends it
        to every rank as soon as one exits, and a rank that is only exiting must not be reported as killed."""
        if not self.active:
            yield self
            return
        global _calls
        _calls += 1
        self._join(device_spec)
        previous = self._catch_sigterm()
        try:
            yield self
        finally:
            self.detach()
            if previous is not None and not self._ignoring:
                signal.signal(signal.SIGTERM, previous)
            if self._owns_group:
                import torch.distributed as dist

                with suppress(Exception):  # leaving must not hide the run's own outcome
                    dist.destroy_process_group()

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Around a rank's start (model, probe): an exception before `agree(None)` is shared with the others."""
        try:
            yield
        except BaseException as exc:
            self.agree(exc)
            raise

    def _join(self, device_spec: str) -> None:
        import datetime

        import torch
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        uses_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
        if dist.is_initialized():  # the caller's own job (the Python API inside a DDP script): use it, keep it
            self.backend = str(dist.get_backend())
        else:
            self.backend = "nccl" if uses_cuda else "gloo"
            try:
                dist.init_process_group(
                    backend=self.backend,
                    init_method="env://",
                    world_size=self.size,
                    rank=self.rank,
                    timeout=datetime.timedelta(seconds=self.timeout),
                )
            except Exception as exc:
                raise RunStopped(
                    f"could not join the {self.size} ranks ({self.backend}, MASTER_ADDR="
                    f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}) within "
                    f"{self.timeout:g} s: {one_line(exc)}"
                ) from None
            self._owns_group = True
        self.attach(_get_default_store())

    def attach(self, store: Any) -> None:
        """Talk through `store` (a c10d Store) from now on, and start the heartbeat there."""
        import torch.distributed as dist

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"gradcam/{attempt}/{_calls}/", store)
        self._heart = threading.Thread(target=self._beat, name="gradcam-heartbeat", daemon=True)
        self._heart.start()

    def detach(self) -> None:
        """Stop the heartbeat (others will soon see this rank as gone)."""
        self._stop.set()

    def _beat(self) -> None:
        store = self.store
        with suppress(Exception):
            store = self.store.clone()  # its own connection, so a long message never delays a beat
        while True:
            try:
                store.add(f"hb/{self.rank}", 1)
            except Exception:
                return  # the store is gone; the main thread finds out the next time it waits
            if self._stop.wait(self.beat_every):
                return

    def _catch_sigterm(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def stop(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the unwinding must not be cut short again
            self.stop_reason = "SIGTERM"
            raise RunStopped(
                "stopped by SIGTERM (torchrun stops every rank when one fails); what this rank wrote is kept: "
                "rerun the same command with --resume to finish",
                exit_code=ExitCode.STOPPED,
            )

        return signal.signal(signal.SIGTERM, stop)

    # --- messages between ranks -----------------------------------------------------------------------------

    def _put(self, key: str, value: Any) -> None:
        self.store.set(key, zlib.compress(json.dumps(value).encode("utf-8"), 1))

    def _wait(self, keys: Mapping[int, str], what: str) -> dict[int, Any]:
        """Wait until every rank's key exists. A rank whose key is missing and whose heartbeat has not moved for
        `timeout` seconds is given up on (None): a slow rank is waited for as long as it lives."""
        pending = dict(keys)
        got: dict[int, Any] = {}
        seen = {r: (-1, time.monotonic()) for r in pending}
        delay = 0.02
        try:
            while pending:
                for r, key in list(pending.items()):
                    if self.store.check([key]):
                        got[r] = json.loads(zlib.decompress(self.store.get(key)))
                        del pending[r]
                        continue
                    beat, now = self.store.add(f"hb/{r}", 0), time.monotonic()
                    if beat != seen[r][0]:
                        seen[r] = (beat, now)
                    elif now - seen[r][1] > self.timeout:
                        got[r] = None
                        del pending[r]
                if pending:
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.5)
        except RunStopped:
            raise
        except Exception as exc:
            raise RunStopped(
                f"lost contact with the torchrun store ({os.environ.get('MASTER_ADDR', '?')}:"
                f"{os.environ.get('MASTER_PORT', '?')}) while waiting for {what}: {one_line(exc)}; what this rank "
                "wrote is kept: rerun the same command with --resume to finish"
            ) from None
        return got

    def gather(self, name: str, value: Any) -> dict[int, Any]:
        """Every rank posts `value`; rank 0 gets {rank: value, or None for a rank that died first}; others get {}."""
        if not self.active:
            return {0: value}
        self._put(f"{name}/{self.rank}", value)
        if self.rank != 0:
            return {}
        return self._wait({r: f"{name}/{r}" for r in range(self.size)}, f"every rank's {name}")

    def broadcast(self, name: str, value: Any = None) -> Any:
        """Rank 0 posts `value`; every rank returns it. A rank whose rank 0 died raises `RunStopped`."""
        if not self.active:
            return value
        if self.rank == 0:
            self._put(f"{name}/0", value)
            return value
        got = self._wait({0: f"{name}/0"}, f"rank 0's {name}")[0]
        if got is None:
            raise RunStopped(
                f"rank 0 stopped responding (no heartbeat for {self.timeout:g} s) while this rank waited for its "
                f"{name}; what this rank wrote is kept: rerun the same command with --resume to finish"
            )
        return got

    def agree(self, error: BaseException | None) -> None:
        """The start line: every rank says whether it is ready (model loaded and probed). If one is not, every
        rank stops: rank 0 raises (its own error, or the first other rank's), the others raise quietly, so the
        terminal gets one line. Call once per run; later calls do nothing."""
        if not self.active or self._agreed:
            return
        self._agreed = True
        mine = None if error is None else {"message": one_line(error), "code": exit_code_of(error)}
        if self.rank == 0:
            verdict: dict[str, Any] = {"rank": None}
            others = list(range(1, self.size))
            if mine is not None:  # no need to wait for the others to be ready
                verdict = {"rank": 0, **mine}
            else:
                views = self.gather("ready", {"error": mine})
                others = [r for r in others if views[r] is not None]
                for r in sorted(views):
                    view = views[r]
                    if view is None:
                        message = f"stopped responding before it was ready (no heartbeat for {self.timeout:g} s)"
                        verdict = {"rank": r, "message": message, "code": int(ExitCode.STOPPED)}
                        break
                    if view["error"] is not None:
                        verdict = {"rank": r, **view["error"]}
                        break
            self.broadcast("verdict", verdict)
            if verdict["rank"] is not None:
                with suppress(RunStopped):  # they read it before rank 0 leaves (it may host the store)
                    self._wait({r: f"bye/{r}" for r in others}, "goodbyes")
        else:
            self._put(f"ready/{self.rank}", {"error": mine})
            try:
                verdict = self.broadcast("verdict")
            except RunStopped:
                if error is not None:
                    return  # rank 0 is gone: this rank's own error is the news, the caller raises it
                raise
            if verdict["rank"] is not None:
                self._hand_off()
        if verdict["rank"] is None:
            return
        if error is not None:
            if self.rank == 0:
                return  # the caller raises its own error, and it is the one printed
            raise RunStopped(one_line(error), exit_code_of(error), quiet=True) from error
        message = f"rank {verdict['rank']} of {self.size}: {verdict['message']}"
        if self.rank == 0:
            if verdict["code"] == ExitCode.USAGE:
                raise GradcamError(message)
            raise RunStopped(message, verdict["code"])
        raise RunStopped(message, verdict["code"], quiet=True)

    def from_rank0(self, name: str, compute: Callable[[], T]) -> T:
        """Rank 0 runs `compute` and every rank gets its (JSON) result. If it raises, rank 0 raises it and the
        others stop quietly with the same exit code."""
        if not self.active:
            return compute()
        if self.rank == 0:
            try:
                value = compute()
            except BaseException as exc:
                self.broadcast(name, {"error": one_line(exc), "code": exit_code_of(exc)})
                with suppress(RunStopped):
                    self._wait({r: f"bye/{r}" for r in range(1, self.size)}, "goodbyes")
                raise
            self.broadcast(name, {"value": value})
            return value
        got = self.broadcast(name)
        if "error" in got:
            self._hand_off()
            raise RunStopped(f"rank 0: {got['error']}", got["code"], quiet=True)
        return got["value"]  # type: ignore[no-any-return]

    def finish(self, report: dict[str, Any], conclude: Callable[[dict[int, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The finish line. Every rank posts its report; rank 0 waits for all of them (or their death), runs
        `conclude(reports)` (merge, run.json), posts the outcome, which every rank returns, and leaves last:
        it waits until every other rank has read the outcome, so no launcher stops it before it has reported."""
        reports = self.gather("report", report)
        if self.rank == 0:
            try:
                outcome = conclude(reports)
            except BaseException as exc:
                self.broadcast("outcome", {"exit_code": exit_code_of(exc), "message": one_line(exc)})
                raise
            self.broadcast("outcome", outcome)
            self._ignore_sigterm()  # merged and recorded: a rank that now exits with its own error stops nothing
            staying = [r for r, v in reports.items() if r != 0 and v and (v["status"] == "complete" or v.get("waits"))]
            self._wait({r: f"bye/{r}" for r in staying}, "goodbyes")
            return outcome
        outcome = self.broadcast("outcome")
        self._hand_off()
        return outcome  # type: ignore[no-any-return]

    def _hand_off(self) -> None:
        """A rank other than 0 has read the outcome: rank 0 reports it from here on. Say goodbye, and let a
        SIGTERM from here to the exit (rank 0 leaving) end nothing that matters."""
        self._put(f"bye/{self.rank}", True)
        self._ignore_sigterm()

    def _ignore_sigterm(self) -> None:
        """From here on, a SIGTERM (torchrun stopping every rank because one exited) could only cut short a rank
        that has nothing left to do but print and exit: ignore it, also after leaving `joined`."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._ignoring = True

    def stopped(self, report: dict[str, Any], exc: BaseException) -> None:
        """A rank's run ended in an exception. Rank 0 tells the others (the outcome) so nobody waits for a
        heartbeat timeout. Another rank tells rank 0 (its report); unless it was stopped from outside (SIGTERM,
        Ctrl-C: everyone is being stopped), it then waits until rank 0 has merged the others' work, since a
        launcher stops every rank as soon as one exits with an error. Best effort: the store may be gone."""
        if not self.active:
            return
        from_outside = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, RunStopped) and not isinstance(exc, MachineFault)  # a full disk is this rank's own
        )
        waits = self.rank != 0 and self.stop_reason is None and not from_outside
        with suppress(Exception):
            self._put(f"report/{self.rank}", {**report, "waits": waits})
            if self.rank == 0:
                self._put("outcome/0", {"exit_code": exit_code_of(exc), "message": one_line(exc)})
            elif waits:
                self.broadcast("outcome")
                self._put(f"bye/{self.rank}", True)


def host() -> str:
    return socket.gethostname()
