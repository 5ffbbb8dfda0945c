"""Scoring archives: a folder tree or an index CSV, into resumable sharded Parquet.

Images are numbered in a fixed order (a sorted walk, or the CSV's order) and cut into
shards of ``shard_size``. A shard is written whole: its maps under
``OUT/maps/part-NNNNN/``, then ``OUT/shards/part-NNNNN.parquet`` atomically, so a
re-run skips every shard whose Parquet file exists. ``OUT/archive.json`` names the
models (by weights checksum) and the images (by checksum of the list) a folder holds,
and a re-run with others is refused instead of mixing them.

Two engines give the same records. ``local`` runs the models in this process, one
category after another within a shard. ``ray`` reads the files with Ray Data and
scores them in ``map_batches`` on a pool of actors, each holding its models on one
thread, so a model loads once per worker; the actors write the maps, this process
writes the Parquet files. With several models each image goes to its category's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.files import refuse_foreign, replace_file
from cflowad.data.images import IMAGE_SUFFIXES, ImageInput, decode_image, readable
from cflowad.engine.catalog import identity
from cflowad.engine.inference import Predictor
from cflowad.engine.loading import load

__all__ = [
    "MANIFEST",
    "Item",
    "archive_items",
    "is_archive_dir",
    "model_for",
    "read_shards",
    "score_archive",
]

MANIFEST = "archive.json"
COLUMNS = ("image", "category", "score", "anomalous", "raw_score", "map")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Item:
    """One image of an archive: its number, its path and the model it goes to."""

    index: int
    image: str
    category: str


def is_archive_dir(path: Path) -> bool:
    """A folder that ``cflowad predict --format parquet`` wrote (it holds the manifest)."""
    return (path / MANIFEST).is_file()


def model_for(category: str, models: dict[str, Path]) -> str | None:
    """The model name of a category: the same name, or its ONNX file ``<category>.onnx``."""
    for name in (category, f"{category}.onnx"):
        if name in models:
            return name
    return None


def archive_items(
    sources: Sequence[Path], models: dict[str, Path], index: Path | None, out: Path
) -> list[Item]:
    """Number the images: the rows of ``index`` (paths relative to the one source folder),
    or every image under the sources (folders walked recursively, sorted), ``out`` left out.

    With one model every image goes to it; with several, to the model named by the
    CSV's category column, or else by the first folder of its path that names one.
    """
    if index is not None:
        if len(sources) != 1 or not sources[0].is_dir():
            raise UserError(
                "option --index: give exactly one folder, the one its paths are relative to"
            )
        rows = list(_read_index(index, sources[0]))
    else:
        rows = [(path, None) for source in sources for path in _walk(source, out)]
    if not rows:
        raise UserError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, sources))}"
        )
    single = next(iter(models)) if len(models) == 1 else None
    items = []
    for number, (path, category) in enumerate(rows):
        if category is None:
            category = single or _category_from_path(path, sources, models)
        elif single is None and model_for(category, models) is None:
            raise UserError(
                f"option --index {index}: {path}: category {category!r} has no model "
                f"(models: {', '.join(models)})"
            )
        items.append(Item(number, str(path), category))
    return items


def _read_index(index: Path, base: Path) -> Iterator[tuple[Path, str | None]]:
    """Rows ``path[,category]`` of a CSV (an optional header row starts with ``path``)."""
    if not index.is_file():
        raise UserError(f"option --index {index}: file not found")
    with index.open(newline="", encoding="utf-8-sig") as handle:  # a BOM from Excel
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip() or (line == 1 and row[0].strip() == "path"):
                continue
            if len(row) > 2:
                raise UserError(f"{index}, line {line}: expected path[,category], got {row}")
            path = base / row[0].strip()
            if not path.is_file():
                raise UserError(f"{index}, line {line}: {path}: file not found")
            category = row[1].strip() if len(row) == 2 and row[1].strip() else None
            yield path, category


def _walk(source: Path, out: Path) -> Iterator[Path]:
    if source.is_file():
        yield source
        return
    if not source.is_dir():
        raise UserError(f"{source}: not found")
    skip = out.resolve()
    for folder, subfolders, files in os.walk(source):
        if Path(folder).resolve() == skip:
            subfolders.clear()
            continue
        subfolders.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(folder) / name


def _category_from_path(path: Path, sources: Sequence[Path], models: dict[str, Path]) -> str:
    base = next((s for s in sources if s.is_dir() and path.is_relative_to(s)), None)
    parts = path.relative_to(base).parts[:-1] if base is not None else path.parts[:-1]
    for part in parts:
        if model_for(part, models) is not None:
            return part
    raise UserError(
        f"{path}: no folder in its path names one of the models ({', '.join(models)}); "
        "put each category's images under a folder of its name, or give --index FILE.csv "
        "with a category column"
    )


def _manifest(models: dict[str, Path], items: list[Item], shard_size: int) -> dict[str, Any]:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.index}\t{item.image}\t{item.category}\n".encode())
    return {
        "format": "cflowad-archive",
        "format_version": 1,
        # a model directory's weights checksum, an export's own files' hash
        "models": {name: str(identity(path)) for name, path in sorted(models.items())},
        "n_images": len(items),
        "images_sha256": digest.hexdigest(),
        "shard_size": shard_size,
        "n_shards": -(-len(items) // shard_size),
    }


def shard_name(shard: int) -> str:
    """``part-00003``: the name of a shard's Parquet file and of its maps' folder."""
    return f"part-{shard:05d}"


def map_path(item: Item, shard_size: int) -> str:
    """Where an image's map goes, relative to OUT."""
    return (
        f"maps/{shard_name(item.index // shard_size)}/{item.index:08d}_{Path(item.image).stem}.npy"
    )


class ModelCache:
    """The models of an archive run, loaded on first use; the least recently used of
    more than ``capacity`` is dropped, so a fleet of hundreds fits in memory."""

    def __init__(self, models: dict[str, Path], device: str = "auto", capacity: int = 4) -> None:
        self.models = models
        self.device = device
        self.capacity = capacity
        self.loaded: OrderedDict[str, Predictor] = OrderedDict()

    def get(self, category: str) -> Predictor:
        """The model of ``category`` (the only model when there is one)."""
        name = (
            next(iter(self.models)) if len(self.models) == 1 else model_for(category, self.models)
        )
        if name is None:
            raise UserError(
                f"category {category!r} has no model (models: {', '.join(self.models)})"
            )
        if name not in self.loaded:
            if len(self.loaded) >= self.capacity:
                self.loaded.popitem(last=False)
            self.loaded[name] = load(self.models[name], self.device)
        self.loaded.move_to_end(name)
        return self.loaded[name]


def plan_batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """A shard's forward passes: its images grouped by category (in order of first
    appearance), cut into batches. Both engines score exactly these batches, so a
    record does not depend on the engine's batching."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.category, []).append(item)
    return [
        group[i : i + batch_size]
        for group in groups.values()
        for i in range(0, len(group), batch_size)
    ]


def score_batch(
    cache: ModelCache,
    items: Sequence[Item],
    images: Sequence[ImageInput],
    out: Path,
    shard_size: int,
) -> list[dict[str, Any]]:
    """Score one batch of a category (``images``: the items' paths or decoded arrays) in
    one forward pass, write the maps under ``out``; records in the items' order."""
    if not items:
        return []
    model = cache.get(items[0].category)
    records = []
    for result in model.predict_iter(list(images), batch_size=len(items)):
        item = items[result.index]
        target = map_path(item, shard_size)
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        np.save(out / target, result.anomaly_map)
        records.append(
            {
                "image": item.image,
                "category": item.category,
                **result.record(),
                "map": target,
            }
        )
    return records


def score_archive(
    models: dict[str, Path],
    items: list[Item],
    out: Path,
    engine: str = "local",
    batch_size: int = 16,
    shard_size: int = 1000,
    workers: int | None = None,
    ray_address: str | None = None,
    device: str = "auto",
    skip_bad: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Score ``items`` into ``out`` (see the module notes); returns the finished manifest."""
    reporter = reporter or Reporter(enabled=False)
    if engine not in ENGINES:
        raise UserError(f"option --engine={engine!r} must be one of {', '.join(ENGINES)}")
    if shard_size < 1:
        raise UserError(f"option --shard-size={shard_size} must be at least 1")
    if batch_size < 1:
        raise UserError(f"option --batch-size={batch_size} must be at least 1")
    pyarrow_parquet()  # fail before any work when pyarrow is missing
    refuse_foreign(out, is_archive_dir)
    manifest = _manifest(models, items, shard_size)
    if is_archive_dir(out):
        earlier = json.loads((out / MANIFEST).read_text())
        differs = [
            k for k in ("models", "images_sha256", "shard_size") if earlier.get(k) != manifest[k]
        ]
        if differs:
            raise UserError(
                f"{out}: holds the scores of other {' and '.join(differs)}; "
                "choose another --out (or remove it to start over)"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    replace_file(out / MANIFEST, json.dumps({**manifest, "complete": False}, indent=2) + "\n")
    shards = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    pending = [k for k in range(len(shards)) if not _shard_file(out, k).is_file()]
    if len(pending) < len(shards):
        reporter.log(
            f"{len(shards) - len(pending)} of {len(shards)} shards already scored, skipped"
        )
    todo = [shards[k] for k in pending]
    start = time.perf_counter()
    count = sum(len(s) for s in todo)
    skipped = 0
    with reporter.task(f"scoring ({engine})", count) as task:
        run = _run_ray if engine == "ray" else _run_local
        for shard, records, problems in run(
            todo, models, out, shard_size, batch_size, workers, ray_address, device, skip_bad
        ):
            for problem in problems:
                if not skip_bad:
                    raise UserError(problem)
                reporter.warn(f"skipped {problem}")
            skipped += len(problems)
            _write_shard(out, shard, records)
            task.advance(len(records) + len(problems))
    seconds = time.perf_counter() - start
    finished = {
        **manifest,
        "complete": True,
        "skipped_images": skipped,
        "seconds": round(seconds, 2),
        "images_per_second": round(count / seconds, 2) if seconds > 0 else None,
        "engine": engine,
    }
    replace_file(out / MANIFEST, json.dumps(finished, indent=2) + "\n")
    return finished


def _shard_file(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard_name(shard)}.parquet"


def pyarrow_parquet() -> Any:
    """pyarrow.parquet, or a one-line error naming the extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            'Parquet output needs pyarrow: pip install "cflowad[ray]" (or pyarrow)'
        ) from None
    return pq


def _write_shard(out: Path, shard: int, records: list[dict[str, Any]]) -> None:
    """The shard's Parquet file, atomically: it exists only once the shard is whole."""
    import pyarrow as pa

    table = pa.Table.from_pylist(records, schema=_schema())
    target = _shard_file(out, shard)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pyarrow_parquet().write_table(table, staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("image", pa.string()),
            ("category", pa.string()),
            ("score", pa.float64()),
            ("anomalous", pa.bool_()),
            ("raw_score", pa.float64()),
            ("map", pa.string()),
        ]
    )


def read_shards(out: Path) -> list[dict[str, Any]]:
    """Every record of a scored archive, in image order (for tests and small archives)."""
    pq = pyarrow_parquet()
    records: list[dict[str, Any]] = []
    for path in sorted((out / "shards").glob("part-*.parquet")):
        records.extend(pq.read_table(path).to_pylist())
    return records


ShardResult = tuple[int, list[dict[str, Any]], list[str]]


def _run_local(
    shards: list[list[Item]],
    models: dict[str, Path],
    out: Path,
    shard_size: int,
    batch_size: int,
    workers: int | None,
    ray_address: str | None,
    device: str,
    skip_bad: bool,
) -> Iterator[ShardResult]:
    if workers is not None:
        raise UserError("option --jobs: the local engine runs one process (see --threads)")
    if ray_address is not None:
        raise UserError("option --ray-address needs --engine ray")
    cache = ModelCache(models, device)
    for items in shards:
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        for batch in plan_batches(items, batch_size):
            paths = [Path(item.image) for item in batch]
            if skip_bad:
                keep, bad = readable(paths)
                problems.extend(bad)
                batch, paths = [batch[i] for i in keep], [paths[i] for i in keep]
            records.extend(score_batch(cache, batch, paths, out, shard_size))
        records.sort(key=lambda record: str(record["map"]))  # "maps/part-N/<index:08d>_..."
        yield items[0].index // shard_size, records, problems


def _run_ray(
    shards: list[list[Item]],
    models: dict[str, Path],
    out: Path,
    shard_size: int,
    batch_size: int,
    workers: int | None,
    ray_address: str | None,
    device: str,
    skip_bad: bool,
) -> Iterator[ShardResult]:
    """Ray Data: read the files, score on ``workers`` actors, stream records back in order."""
    from cflowad.fleet.training import import_ray

    ray = import_ray(ray_address)
    if device not in ("auto", "cpu"):
        raise UserError(f"option --device={device}: the Ray engine scores on CPUs")
    if not shards:
        return
    from ray import data as ray_data

    context = ray_data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards complete one after another
    context.enable_progress_bars = False  # cflowad's own progress counts the shards
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = [
        {"items": json.dumps([[item.index, item.image, item.category] for item in batch])}
        for items in shards
        for batch in plan_batches(items, batch_size)
    ]
    dataset = (
        ray_data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64 * workers)))
        # Reading is I/O: it asks for no CPU, so it never waits for a core an actor
        # holds; without a CPU to count, only ``concurrency`` bounds its tasks.
        .map_batches(
            _read_files,
            batch_size=1,
            batch_format="pandas",
            num_cpus=0,
            compute=ray_data.TaskPoolStrategy(size=workers),
        )
        .map_batches(
            _Scorer,
            fn_constructor_kwargs={
                "models": {k: str(v) for k, v in models.items()},
                "out": str(out),
                "shard_size": shard_size,
            },
            compute=ray_data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            batch_size=1,
            batch_format="pandas",
        )
    )
    expected = {items[0].index // shard_size: len(items) for items in shards}
    current: dict[int, tuple[list[dict[str, Any]], list[str]]] = {}
    try:
        for row in dataset.iter_rows():
            shard = int(row["index"]) // shard_size
            records, problems = current.setdefault(shard, ([], []))
            if row["error"]:
                problems.append(str(row["error"]))
            else:
                records.append({name: _plain(row[name]) for name in COLUMNS})
            if len(records) + len(problems) == expected[shard]:
                del current[shard]
                records.sort(key=lambda record: str(record["map"]))
                yield shard, records, problems
    except Exception as error:
        raise _user_error_in(error) or error from None


def _plain(value: Any) -> Any:
    """A numpy scalar from a Ray batch as the Python value the local engine writes."""
    return value.item() if isinstance(value, np.generic) else value


def _user_error_in(error: BaseException) -> UserError | None:
    """The UserError a Ray worker raised, from the exceptions Ray wraps it in."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, UserError):
            return UserError(str(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def _read_files(batch: Any) -> Any:
    """Ray Data's read step: the bytes of each planned batch's files."""
    batch["data"] = [
        [Path(image).read_bytes() for _, image, _ in json.loads(items)] for items in batch["items"]
    ]
    return batch


class _Scorer:
    """A Ray actor: the models on one thread, loaded once; decodes, scores, writes maps."""

    def __init__(self, models: dict[str, str], out: str, shard_size: int) -> None:
        import torch

        torch.set_num_threads(1)  # one actor per CPU
        self.cache = ModelCache({k: Path(v) for k, v in models.items()}, "cpu")
        self.out = Path(out)
        self.shard_size = shard_size

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        rows: list[dict[str, Any]] = []
        for planned, contents in zip(batch["items"], batch["data"], strict=True):
            items, images = [], []
            for (index, image, category), data in zip(json.loads(planned), contents, strict=True):
                try:
                    images.append(decode_image(data, image))
                    items.append(Item(index, image, category))
                except UserError as error:
                    rows.append({"index": index, "error": str(error)})
            records = score_batch(self.cache, items, images, self.out, self.shard_size)
            rows.extend(
                {"index": item.index, "error": "", **record}
                for item, record in zip(items, records, strict=True)
            )
        for row in rows:
            row.setdefault("error", "")
        return pd.DataFrame(rows)
