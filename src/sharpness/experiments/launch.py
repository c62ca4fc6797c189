"""Start N processes of a command on this machine through ``torch.distributed``'s elastic agent (what ``torchrun``
runs), for ``sharpness train|compare --nproc-per-node N``.

The agent gives every process ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``, ...) after a standalone rendezvous on localhost, watches them, and when one fails
stops the others; there are no restarts (``max_restarts=0``): a failed job is resumed from its checkpoint.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Sequence


class WorkerFailed(Exception):
    """A process of the job failed and the agent stopped the others.

    ``rank`` and ``exitcode`` are those of the first failure (a negative exit code is the signal that killed it).
    """

    def __init__(self, rank: int, exitcode: int, how: str) -> None:
        super().__init__(f"rank {rank} {how}")
        self.rank, self.exitcode = rank, exitcode


def launch(command: Sequence[str], nproc: int) -> None:
    """Run ``command`` (a program and its arguments) in ``nproc`` processes on this machine; return when all end.

    Raises :class:`WorkerFailed` when one fails, and ``KeyboardInterrupt`` when the launcher is interrupted
    (Ctrl-C, SIGTERM): the agent then stops the processes.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="sharpness-launch-") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"sharpness-{uuid.uuid4().hex}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, command[0])(*command[1:])
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = failure.exitcode
            how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with status {code}"
            raise WorkerFailed(rank, code, how) from None
        except SignalException:
            raise KeyboardInterrupt from None
