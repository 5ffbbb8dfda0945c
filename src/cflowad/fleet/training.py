"""Training a fleet: one model per category of a root, N at once, on a process pool or Ray.

Every category is the same job wherever it runs (:func:`train_category`): train in a
fresh process with a fixed share of the cores, and hand back the model's files as
bytes. This process writes them, so a Ray worker needs to read the images but never
the output folder, and a category's files appear whole or not at all. Training is
bit for bit the same on any number of threads (:func:`cflowad.method.train.training_features`),
so a fleet trained serially, with ``--jobs N`` or on Ray holds the same weights.

``MODELS/fleet.json`` records each category as it finishes (atomically), which makes a
stopped run resumable: a category whose model was trained from the same configuration
and the same training files is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

from cflowad.common.allocator import release_freed_memory
from cflowad.common.errors import UserError, reason
from cflowad.common.progress import Reporter
from cflowad.data.datasets import find_training_images
from cflowad.data.files import refuse_foreign, replace_file, staged_directory
from cflowad.data.images import readable
from cflowad.engine.catalog import identity
from cflowad.engine.model import is_model_dir
from cflowad.method.config import Config

__all__ = [
    "FLEET_FILE",
    "Category",
    "Job",
    "Outcome",
    "cores",
    "find_categories",
    "fingerprint",
    "import_ray",
    "train_category",
    "train_fleet",
]

FLEET_FILE = "fleet.json"
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Category:
    """One category of a root: its training images' folder and its model's folder."""

    name: str
    source: Path
    target: Path


@dataclass(frozen=True)
class Job:
    """How every category of a run trains: plain data, sent to each worker."""

    config: dict[str, Any]
    threads: int
    skip_bad: bool
    device: str


@dataclass
class Outcome:
    """What one category's job hands back: its fleet.json record and, on success, files."""

    name: str
    record: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def find_categories(root: Path, out: Path) -> list[Category]:
    """The categories of a root (subfolders with ``train/good``), sorted; [] for a single one."""
    if not root.is_dir() or (root / "train").is_dir():
        return []
    return [
        Category(p.name, p, out / p.name)
        for p in sorted(root.iterdir())
        if (p / "train" / "good").is_dir()
    ]


def fingerprint(config: Config, images: list[Path]) -> str:
    """What a model is trained from: the requested configuration and the training files
    (names and sizes). Equal fingerprints mean a finished model need not be retrained."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for image in images:
        digest.update(f"\n{image.name}\t{image.stat().st_size}".encode())
    return digest.hexdigest()


def train_category(name: str, source: str, job: Job) -> Outcome:
    """Train one category on ``job.threads`` threads; never raises (a failure is a record).

    Runs in a worker (a pool process or a Ray task): arguments and result are plain
    data, and the model comes back as its files' bytes.
    """
    import torch

    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = Config.from_dict(job.config)
        outcome = _train(name, Path(source), config, job.skip_bad, job.device, start)
    outcome.record["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
    release_freed_memory()  # the pool reuses this process for the next category
    return outcome


def _train(
    name: str, source: Path, requested: Config, skip_bad: bool, device: str, start: float
) -> Outcome:
    from cflowad.engine.model import CFlowAD

    try:
        images = find_training_images(source)
        skipped: list[str] = []
        if skip_bad:
            keep, problems = readable(images)
            for problem in problems:
                warnings.warn(f"skipped {problem}", UserWarning, stacklevel=1)
            skipped = [str(p) for i, p in enumerate(images) if i not in set(keep)]
            images = [images[i] for i in keep]
        model = CFlowAD(requested, device=device).fit(images)
        with tempfile.TemporaryDirectory(prefix="cflowad-fleet-") as scratch:
            folder = model.save(Path(scratch) / name)
            files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        calibration = model.fitted_calibration()
        record = {
            "status": "trained",
            "model": name,
            "weights_sha256": model.weights_sha256,
            "image_threshold_raw": calibration.image_threshold_raw,
            "pixel_threshold_raw": calibration.pixel_threshold_raw,
            "image_fpr": calibration.image_fpr,
            "held_out_fpr": calibration.image_fpr_achievable,
            "n_train": model.training["n_train"],
            "n_calibration": model.training["n_calibration"],
            "skipped_images": skipped,
            "fingerprint": fingerprint(requested, images),
            "seconds": round(time.perf_counter() - start, 2),
        }
        return Outcome(name, record, files)
    except Exception as error:  # one category's failure must not stop the others
        record = {
            "status": "failed",
            "error": reason(error),
            "user_error": isinstance(error, UserError),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if not isinstance(error, UserError):
            record["traceback"] = traceback.format_exc()
        return Outcome(name, record)


def cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def train_fleet(
    categories: list[Category],
    out: Path,
    config: Config,
    jobs: int = 1,
    engine: str = "local",
    ray_address: str | None = None,
    threads: int | None = None,
    skip_bad: bool = False,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Train every category (N at once), write ``out/fleet.json``; returns its content.

    Finished categories with the same fingerprint are skipped. A failing category is
    recorded and the others go on; the caller decides the exit code from the records.
    """
    reporter = reporter or Reporter(enabled=False)
    if jobs < 1:
        raise UserError(f"option --jobs={jobs} must be at least 1")
    if engine not in ENGINES:
        raise UserError(f"option --engine={engine!r} must be one of {', '.join(ENGINES)}")
    if engine != "ray" and ray_address is not None:
        raise UserError("option --ray-address needs --engine ray")
    threads = threads or max(1, cores() // jobs)
    if threads < 1:
        raise UserError(f"option --threads={threads} must be at least 1")
    if engine == "ray" and device not in ("auto", "cpu"):
        raise UserError(f"option --device={device}: the Ray engine trains on CPUs")
    job = Job(config.to_dict(), threads, skip_bad, "cpu" if engine == "ray" else device)
    for category in categories:
        refuse_foreign(category.target, is_model_dir, "--out")  # before any training
    fleet = _read_fleet(out)
    fleet["config"] = config.to_dict()
    records: dict[str, dict[str, Any]] = fleet["categories"]
    pending = []
    for category in categories:
        if _up_to_date(category, records.get(category.name), config):
            reporter.log(f"{category.name}: up to date ({category.target}), skipped")
        else:
            pending.append(category)
    reporter.log(
        f"training {len(pending)} of {len(categories)} categories, {jobs} at once "
        f"with {threads} threads each ({engine})"
    )
    run = _run_ray if engine == "ray" else _run_local
    with reporter.task("categories", len(pending)) as task:
        for outcome in run(pending, job, jobs, ray_address):
            category = next(c for c in pending if c.name == outcome.name)
            if outcome.record["status"] == "trained":
                _write_model(category.target, outcome.files)
                reporter.log(
                    f"{category.name}: trained in {outcome.record['seconds']:.0f} s -> "
                    f"{category.target}"
                )
            else:
                reporter.warn(f"{category.name}: failed: {outcome.record['error']}")
            for message in outcome.record.get("warnings", []):
                reporter.warn(f"{category.name}: {message}")
            records[category.name] = outcome.record
            fleet["categories"] = dict(sorted(records.items()))
            replace_file(out / FLEET_FILE, json.dumps(fleet, indent=2) + "\n")
            task.advance(1)
    fleet["categories"] = dict(sorted(records.items()))
    replace_file(out / FLEET_FILE, json.dumps(fleet, indent=2) + "\n")
    return fleet


def _read_fleet(out: Path) -> dict[str, Any]:
    path = out / FLEET_FILE
    if not path.is_file():
        return {"format": "cflowad-fleet", "format_version": 1, "categories": {}}
    try:
        fleet = json.loads(path.read_text())
        if not isinstance(fleet.get("categories"), dict):
            raise ValueError("no categories")
    except (ValueError, AttributeError) as error:
        raise UserError(f"{path}: not a cflowad fleet file ({error}); move it away") from None
    return dict(fleet)


def _up_to_date(category: Category, record: dict[str, Any] | None, config: Config) -> bool:
    """Whether the finished model of ``record`` is still there and trained as requested."""
    if not record or record.get("status") != "trained" or not is_model_dir(category.target):
        return False
    try:
        images = find_training_images(category.source)
    except UserError:
        return False
    # a category trained with --skip-bad fingerprints the images it kept
    skipped = set(record.get("skipped_images", []))
    kept = [p for p in images if str(p) not in skipped]
    return bool(
        identity(category.target) == record.get("weights_sha256")
        and record.get("fingerprint") == fingerprint(config, kept)
    )


def _write_model(target: Path, files: dict[str, bytes]) -> None:
    with staged_directory(target, is_model_dir, "--out") as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)


def _run_local(
    pending: list[Category], job: Job, jobs: int, ray_address: str | None
) -> Iterator[Outcome]:
    """A pool of ``jobs`` processes, spawned (a fork would copy torch's thread pools)."""
    if not pending:
        return
    with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=get_context("spawn")) as pool:
        running: dict[Future[Outcome], Category] = {}
        queue = list(pending)
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    c = queue.pop(0)
                    future = pool.submit(train_category, c.name, str(c.source), job)
                    running[future] = c
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    category = running.pop(future)
                    try:
                        yield future.result()
                    except Exception as error:  # the worker process died (memory, signal)
                        yield Outcome(category.name, _died(error))
        except BaseException:  # Ctrl-C, or the caller stopped early: stop the workers too
            pool.shutdown(wait=False, cancel_futures=True)
            for process in active_children():
                process.terminate()
            raise


def _run_ray(
    pending: list[Category], job: Job, jobs: int, ray_address: str | None
) -> Iterator[Outcome]:
    """One Ray task per category asking for ``job.threads`` CPUs; results as they finish."""
    ray = import_ray(ray_address)
    if not pending:
        return
    task = ray.remote(num_cpus=job.threads, max_retries=0)(train_category)
    running = {task.remote(c.name, str(c.source), job): c for c in pending}
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                category = running.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as error:  # the worker died
                    yield Outcome(category.name, _died(error))
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise


def _died(error: BaseException) -> dict[str, Any]:
    return {
        "status": "failed",
        "error": f"the worker running it died ({type(error).__name__}: {error})",
        "user_error": False,
    }


def import_ray(address: str | None) -> Any:
    """Ray, connected: to ``address``, to the running local cluster, or to a new one."""
    try:
        import ray
    except ImportError:
        raise UserError('option --engine ray needs Ray: pip install "cflowad[ray]"') from None
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except ConnectionError as error:
            raise UserError(f"option --ray-address={address}: {error}") from None
    return ray
