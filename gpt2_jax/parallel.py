"""The parallel layer: pmap layout, replicas, prefetching, and the processes of a multi-host run.

The same pmapped step spans every device of every process (``jax.distributed``): each process
feeds its own rows of every global batch, and the processes agree (all-gathers) on every
decision that must be taken at the same step: errors, signals, overdue saves.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gpt2_jax.core import AXIS, Batch
from gpt2_jax.errors import UserError


def replicate(tree, devices: Sequence[jax.Device] | None = None):
    """``tree`` on every one of the local ``devices``, with no device axis: the layout the pmapped steps
    take their state and parameters in (``in_axes=None``) and give the state back in (``out_axes=None``).

    Why not one copy per device along a leading axis (``flax.jax_utils.replicate``): pmap squeezes such
    an axis on the way in and adds it back on the way out, and XLA then copies every donated input
    before the step writes over it. Small's bf16 step on a 2-core CPU (AMD EPYC, Zen 4) copied its whole
    train state (1.3 GB) each step: 396 tokens/s against 440 without the axis (best of 4 x 3 steps, the
    two layouts alternating; bitwise the same states).
    """
    mesh = jax.sharding.Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def device_sharding(devices: Sequence[jax.Device] | None = None) -> jax.sharding.NamedSharding:
    """Leading axis split over the local ``devices``: the layout pmap's mapped inputs (batches) take."""
    mesh = jax.sharding.Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def unreplicate_global(tree):
    """A copy of ``tree`` (``replicate``'s layout: the value on every local device) as global arrays
    replicated over every device of every process.

    That is the form in which Orbax saves a replicated value from several processes: every process
    calls save, and only the holder of replica 0 writes. (A process's own replicated array is
    host-local, which Orbax refuses in a multi-process run.) A copy, so that the next step, which
    donates the state, cannot free what an asynchronous save still reads.
    """
    leaves, treedef = jax.tree.flatten(_copy(tree))
    devices = set(jax.local_devices())
    everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                            jax.sharding.PartitionSpec())
    out = []
    for x in leaves:
        shards = [s.data for s in x.addressable_shards]
        assert {s.device for s in x.addressable_shards} == devices and x.sharding.is_fully_replicated, x.sharding
        out.append(jax.make_array_from_single_device_arrays(x.shape, everywhere, shards))
    return jax.tree.unflatten(treedef, out)


def prefetch_to_devices(items: Iterator[tuple[Any, Batch]], sharding: jax.sharding.Sharding,
                        depth: int = 2) -> Iterator[tuple[Any, Batch]]:
    """``(tag, batch)`` pairs with each batch already sent to the devices, ``depth`` batches ahead.

    Transfers are asynchronous, so the host builds and sends the next batches while the devices
    run the dispatched steps. A tag (the data position after the batch) travels with its batch,
    so whoever consumes a batch knows exactly where the stream stands, however far ahead it was read.
    """
    assert depth >= 1, depth
    queue: collections.deque = collections.deque()

    def enqueue(n: int) -> None:
        for tag, batch in itertools.islice(items, n):
            queue.append((tag, jax.device_put(batch, sharding)))

    enqueue(depth)
    while queue:
        yield queue.popleft()
        enqueue(1)


def collectives_need_serial_dispatch() -> bool:
    """True where independent pmapped calls must not be queued ahead: several CPU devices in a process.

    XLA:CPU runs every local device's executions on one thread pool (a thread per core). Calls
    with no data dependency between them (evaluation batches) may then run concurrently, and
    with as few threads as devices every thread can end up in an all-reduce waiting for a peer
    execution that never gets a thread: measured on 2 cores with 2 devices at tiny size, the
    validation pass aborted with "rendezvous ... Termination timeout of 40 seconds exceeded".
    """
    return jax.local_devices()[0].platform == "cpu" and jax.local_device_count() > 1


def evaluate(p_eval_step: Callable, params, batches: Iterable[Batch]) -> tuple[float, float]:
    """(total NLL in nats, scored tokens) of a pmapped ``eval_step`` (``in_axes=(None, 0)``, ``params`` as
    ``replicate`` lays them out) over ``batches``, summed in float64."""
    serial = collectives_need_serial_dispatch()
    outs = []
    for b in batches:  # dispatched back to back (one at a time where they would deadlock), fetched once
        outs.append(p_eval_step(params, b))
        if serial:
            jax.block_until_ready(outs[-1])
    host = jax.device_get(outs)
    nll = math.fsum(float(o["nll_sum"][0]) for o in host)
    tokens = math.fsum(float(o["tokens"][0]) for o in host)
    return nll, tokens


def check_divisible(what: str, n: int) -> None:
    devices, processes = jax.device_count(), jax.process_count()
    if n % devices:
        where = (f"{devices} local devices" if processes == 1 else
                 f"{devices} devices ({processes} processes x {jax.local_device_count()} local devices)")
        raise UserError(f"--{what}={n} is not divisible by the {where}; use a multiple of {devices}")


def cluster_task_count(environ: Mapping[str, str]) -> int:
    """Tasks of the srun (SLURM) or mpirun (Open MPI) launch this process is part of; 1 outside both.

    Reads the variables ``jax.distributed.initialize()`` configures itself from, so a run is made
    distributed automatically exactly when JAX would find its peers there.
    """
    if "OMPI_MCA_orte_hnp_uri" in environ and "OMPI_COMM_WORLD_SIZE" in environ:  # set by mpirun only
        return int(environ["OMPI_COMM_WORLD_SIZE"])
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in environ for v in slurm):
        return int(environ["SLURM_NTASKS"])
    return 1


def init_distributed(environ: Mapping[str, str], *, distributed: bool | None = None,
                     coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: Sequence[str] | None = None) -> bool:
    """Join the multi-process run the settings (or the cluster environment) ask for; False when there is none.

    The arguments are ``train``'s flags of the same names. Must run before anything else touches
    JAX: it decides which devices exist.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id, "local_device_ids": local_device_ids}
    explicit = [k for k, v in given.items() if v is not None]
    if distributed is False:
        if explicit:
            raise UserError(f"--nodistributed contradicts --{explicit[0]}; drop one of them")
        return False
    if not (distributed or explicit or cluster_task_count(environ) > 1):
        return False
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    ids = local_device_ids
    if ids is not None and not all(i.strip().isdigit() for i in ids):  # isdigit: also refuses -1
        raise UserError(f"--local_device_ids must be integers like 0 or 0,1, got {','.join(ids)}")
    local_ids = None if ids is None else [int(i) for i in ids]
    # CPU devices of different processes all-reduce through gloo (GPUs use NCCL, TPUs their own links).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_ids)
    except ValueError as e:  # settings missing and no cluster environment to read them from
        raise UserError(f"cannot start a distributed run ({_first_line(e)}); outside SLURM, Open MPI or a TPU pod "
                        f"pass --coordinator_address=HOST:PORT, --num_processes and --process_id") from None
    except RuntimeError as e:  # coordinator unreachable, timed out, or JAX already in use in this process
        raise UserError(f"cannot join the distributed run at {coordinator_address or 'the detected coordinator'} "
                        f"({_first_line(e)}); start every process with the same --coordinator_address, "
                        f"--num_processes and a distinct --process_id") from None
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def all_ok(error: UserError | None, doing: str) -> None:
    """Raise in every process if ``error`` happened in any, so no process waits forever for a failed peer."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is not None:
        raise error
    if failed.any():
        raise UserError(f"process {int(np.argmax(failed))} failed while {doing} (its error says why); "
                        f"every process stops")


class CheckIns:
    """Where the processes of a run agree on signals and overdue saves, and when they next will.

    Every process must take the same decision at the same step, so the steps between check-ins
    come from an all-gather too: as many as the slowest process does in ``CHECK_IN_SECONDS``,
    at least 1 and at most ``--log_every``. A signal is then acted on within a few seconds however
    slow a step is. One process checks in at every step (nothing to agree on).
    """

    CHECK_IN_SECONDS = 5.0

    def __init__(self, step: int):
        self.next_step, self._step, self._time = step + 1, step, time.monotonic()

    def __call__(self, step: int, signum: int, overdue: bool, log_every: int) -> tuple[int, bool]:
        """(a signal any process received or 0, whether any process is overdue for a save)."""
        now = time.monotonic()
        step_ms = 1000 * (now - self._time) / max(step - self._step, 1)
        self._step, self._time = step, now
        if jax.process_count() == 1:
            self.next_step = step + 1
            return signum, overdue
        votes = multihost_utils.process_allgather(np.asarray([signum, overdue, math.ceil(step_ms)], np.int32))
        slowest_s = max(int(votes[:, 2].max()), 1) / 1000
        every = max(1, min(log_every, int(self.CHECK_IN_SECONDS / slowest_s)))
        self.next_step = (step // every + 1) * every  # multiples of --log_every while steps are fast
        signals = [int(v) for v in votes[:, 0] if v]
        return (signals[0] if signals else 0), bool(votes[:, 1].any())
