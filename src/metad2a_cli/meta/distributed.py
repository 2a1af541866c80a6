"""Database labels on a Ray cluster: ``metad2a db build DB -s SOURCE... --ray [ADDRESS]``.

Each work unit (a task's cells still to label, ``db.WorkUnit``) becomes one Ray task that
runs ``db.label_unit``, the function a local build runs. Records come back to the driver,
where ``db.build`` appends them as it does for a local build, so a Ray build keeps the local
one's guarantees: one writer, fsynced lines, the same command resumes, no (task, cell)
written twice. A unit's seed is its task's, so whichever worker runs it, and however often,
it gives the same records.

Ray is an optional dependency (``pip install 'metad2a[ray]'``), imported in this module only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..errors import UserError
from .db import BuildSettings, Record, Runner, WorkUnit, default_chunk, label_unit

# A unit whose worker process or node died runs again this often before the build stops.
MAX_RETRIES = 3


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'metad2a[ray]'") from None
    return ray


def worker_resources(cluster_gpus: float, gpus_per_worker: float | None) -> dict:
    """What each unit asks Ray for: a share of a GPU where the cluster has GPUs, else a CPU."""
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpus else 0.0
    if gpus_per_worker and not cluster_gpus:
        raise UserError(f"--ray-gpus-per-worker {gpus_per_worker:g}: the Ray cluster has no GPUs")
    # One CPU each, GPU or not: it feeds the batches, and Ray sizes the worker's threads by it.
    return {"num_cpus": 1, "num_gpus": gpus_per_worker}


def label_on_worker(unit: WorkUnit, settings: BuildSettings, chunk: int) -> list[Record]:
    """The body of a Ray task: label the unit on the GPU Ray gave this worker, if any."""
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return [r for group in label_unit(unit, settings, device, chunk or default_chunk(device)) for r in group]


def ray_runner(address: str = "local", gpus_per_worker: float | None = None, chunk: int = 0) -> Runner:
    """A ``db.build`` runner that labels on Ray: ``address`` ``local`` starts a Ray instance on
    this machine (stopped when the build ends); ``auto``, ``host:6379`` or ``ray://host:10001``
    joins a running cluster. ``chunk`` 0 picks each worker's default for its device."""
    if gpus_per_worker is not None and not 0 <= gpus_per_worker <= 1:
        raise UserError(f"--ray-gpus-per-worker must be between 0 and 1 (a share of one GPU), got {gpus_per_worker:g}")
    ray = import_ray()

    def run(units: Sequence[WorkUnit], settings: BuildSettings) -> Iterator[list[Record]]:
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=address)
            except ConnectionError as err:
                raise UserError(f"no Ray cluster at {address}: {err}") from None
        pending: dict = {}
        try:
            resources = worker_resources(ray.cluster_resources().get("GPU", 0), gpus_per_worker)
            task = ray.remote(label_on_worker).options(max_retries=MAX_RETRIES, **resources)
            pending = {task.remote(unit, settings, chunk): unit for unit in units}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    yield _records(ray, ref, pending.pop(ref))
        finally:
            # On an error or Ctrl-C, stop the units still queued or running on the cluster. A
            # driver that leaves takes its tasks with it; force-cancelling them one by one can
            # crash Ray 2.60's driver when a unit finishes meanwhile (a failed check in
            # TaskManager::CompletePendingTask), so cancel only when the caller keeps Ray.
            if started:
                ray.shutdown()
            else:
                for ref in pending:
                    ray.cancel(ref, force=True)

    return run


def _records(ray, ref, unit: WorkUnit) -> list[Record]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise err.cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError) as err:
        raise UserError(
            f"task {unit.task.id}'s worker died {MAX_RETRIES + 1} times ({type(err).__name__}); "
            "the records written so far are kept: run the same command to resume"
        ) from None
