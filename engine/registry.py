"""The models the engine serves, by name and version; loading, hot swap, lookup.

Files. ``load_folder`` loads every ``*.safetensors`` directly inside a folder (default: the
repo's bundled ``models/``). It does not recurse: ``models/eval/`` holds the evaluation
classifier, and a file whose kind is not served (``Shape.NOT_SERVED``) is skipped. Each
file is rebuilt by ``engine.modelfile.load_model`` (tensors copied out of safetensors' memory map)
and warmed up with one small forward pass. A file that cannot be used becomes a ``LoadFailure``
(its path and the reason), is logged, and the other files still load.

Names and versions. A file ``NAME.safetensors`` serves model NAME, version 1; a file
``NAME@V.safetensors`` serves version V (a positive integer): the version sits in the file name
so that an operator sees it in ``ls`` and two versions can sit side by side in one folder. NAME
must match ``^[a-z0-9][a-z0-9._-]{0,63}$`` (a file that does not is refused). Requests name a
model, and optionally a version (the latest when absent); a name is only ever a key of the
registry's dict, never part of a path, so ``../x`` or ``a/b`` simply are not found.

Hot swap and in-flight work. The table of models is replaced, never mutated: a writer builds a
new dict and publishes it under a lock, readers take the current dict with one attribute read.
``get`` returns a ``ServedModel``, an immutable entry holding the loaded module; a caller holds
that entry for the whole of its request (or batch), so after a ``load`` or ``publish`` new lookups
get the new version while work in flight finishes on the version it started with; the old module
is freed when its last holder lets go. Loading and warm-up (``prepare``) happen before the lock is
taken, so serving never waits on a file being read.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.errors import ModelFileError, ModelNotFound, brief_repr
from engine.images import ImageGenerator, ImageRequest
from engine.kinds import Shape, Steps, known_kinds
from engine.limits import ImageLimits
from engine.logs import get_logger
from engine.modelfile import LoadedModel, load_model, read_header
from engine.steps import IterativeImages, StepBatch

log = get_logger("engine.registry")


DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SUFFIX = ".safetensors"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,8}$")


@dataclass(frozen=True)
class LoadFailure:
    """A file that was refused, and why (its path is the operator's, never a client's)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageInfo:
    max_n: int  # samples per request
    image_size: int  # samples are image_size x image_size, uint8 (float32 on request)
    latent_dim: int
    conditional: bool  # config.num_classes > 0
    labels_accepted: bool  # conditional models only
    label_range: tuple[int, int] | None  # inclusive, e.g. (0, 9); None when labels are not accepted
    steps: Steps | None = None  # iterative models: the steps a request may ask for, and the defaults


@dataclass(frozen=True)
class TextInfo:
    vocab: str  # the characters a prompt may use
    context_window: int  # tokens the model sees at once (config.block_size)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    kind: str
    summary: str
    parameters: int
    device: str
    latest: bool  # list_models: an unversioned lookup gets this version (an entry's own info is not updated)
    image: ImageInfo | None = None
    text: TextInfo | None = None


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One version of one model, as served. Hold it for the whole of a request: a reload never changes it."""

    name: str
    version: int
    model: LoadedModel
    info: ModelInfo
    images: ImageGenerator | None  # one-shot image models only; text models decode in the engine's DecodeBatch
    stepper: IterativeImages | None = None  # iterative image models only: their requests advance in the engine's StepBatch
    loaded_at: float = field(default_factory=time.time)
    load_ms: float = 0.0  # reading and checking the file
    warmup_ms: float = 0.0  # the first forward pass

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def path(self) -> Path:
        return self.model.path


@dataclass(frozen=True)
class FolderReport:
    loaded: list[ServedModel]
    failures: list[LoadFailure]
    skipped: list[Path]  # files of kinds that are not served (the evaluation classifier)


def parse_file_name(path: Path) -> tuple[str, int]:
    """``NAME.safetensors`` -> (NAME, 1); ``NAME@V.safetensors`` -> (NAME, V); else ModelFileError."""
    if not path.name.endswith(SUFFIX):
        raise ModelFileError(path, f"model files end in {SUFFIX}")
    stem = path.name[: -len(SUFFIX)]
    name, at, version = stem.rpartition("@")
    if not at:
        name, version = stem, "1"
    if not NAME_PATTERN.match(name):
        raise ModelFileError(path, f"model name {name!r} does not match {NAME_PATTERN.pattern} (lower-case letters, digits, . _ -)")
    if not _VERSION_PATTERN.match(version):
        raise ModelFileError(path, f"version {version!r} is not a positive integer (NAME@V.safetensors, V >= 1)")
    return name, int(version)


def failure_reason(e: Exception) -> str:
    """A load error as a reason without the path (a LoadFailure carries the path itself)."""
    if isinstance(e, ModelFileError):
        return f"tensor {e.tensor!r}: {e.reason}" if e.tensor else e.reason
    return f"{type(e).__name__}: {e}"


class ModelRegistry:
    """The served models, by name and version. Lookups are lock-free; loads and unloads publish a new table."""

    def __init__(self, device: torch.device | str = "cpu", image_limits: ImageLimits | None = None) -> None:
        self.device = torch.device(device)
        self.image_limits = image_limits or ImageLimits()
        self._table: dict[str, dict[int, ServedModel]] = {}  # replaced, never mutated
        self._lock = threading.Lock()  # serialises writers only
        self.failures: list[LoadFailure] = []  # from the last load_folder

    @classmethod
    def from_folder(
        cls, folder: str | Path = DEFAULT_MODELS_DIR, device: torch.device | str = "cpu", image_limits: ImageLimits | None = None
    ) -> ModelRegistry:
        registry = cls(device, image_limits)
        registry.load_folder(folder)
        return registry

    # -- loading ----------------------------------------------------------------------------------

    def load_folder(self, folder: str | Path = DEFAULT_MODELS_DIR) -> FolderReport:
        """Load every model file directly inside ``folder``; refuse bad ones without stopping."""
        root = Path(folder)
        if not root.is_dir():
            raise NotADirectoryError(f"models folder {root} does not exist or is not a folder")
        loaded: list[ServedModel] = []
        failures: list[LoadFailure] = []
        skipped: list[Path] = []
        seen: dict[tuple[str, int], Path] = {}
        for path in sorted(root.glob("*" + SUFFIX)):  # glob("*...") does not recurse
            try:
                if not path.is_file():
                    raise ModelFileError(path, "is not a regular file")
                key = parse_file_name(path)
                if key in seen:
                    raise ModelFileError(path, f"duplicates {key[0]} version {key[1]} of {seen[key].name}")
                if not self._served_kind(path):
                    log.info("model_skipped", path=str(path), reason="a kind that is not served (evaluation)")
                    skipped.append(path)
                    continue
                seen[key] = path
                loaded.append(self.load(path))
            except Exception as e:  # one bad file must not stop the others; each is reported
                failure = LoadFailure(path, failure_reason(e))
                log.error("model_refused", path=str(path), reason=failure.reason)
                failures.append(failure)
        if not loaded:
            log.warning("no_models_loaded", folder=str(root), failures=len(failures))
        self.failures = failures
        return FolderReport(loaded, failures, skipped)

    @staticmethod
    def _served_kind(path: Path) -> bool:
        """Whether the file's kind is served (unknown kinds count as served: loading names them)."""
        kind = known_kinds().get(read_header(path)[1].get("kind", ""))
        return kind is None or kind.served

    def load(self, path: str | Path, *, name: str | None = None, version: int | None = None) -> ServedModel:
        """Load a file and serve it; name and version come from its file name unless given.

        Loading the same name and version again replaces it (a reload); a new version becomes the
        latest if it is the highest. Raises ModelFileError naming the file.
        """
        entry = self.prepare(path, name=name, version=version)
        self.publish(entry)
        return entry

    def prepare(self, path: str | Path, *, name: str | None = None, version: int | None = None) -> ServedModel:
        """Load and warm up a file as an entry that is not served yet (``publish`` serves it).

        For a caller that must get ready for a model before a request can reach it: the server
        starts a new model's stages between the two. Raises ModelFileError naming the file.
        """
        p = Path(path)
        if name is None or version is None:
            file_name, file_version = parse_file_name(p)
            name = file_name if name is None else name
            version = file_version if version is None else version
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelFileError(p, f"version must be a positive integer, got {version!r}")
        model, images, stepper, load_ms, warmup_ms = self._load_file(name, p)
        info = self._info(name, version, model, stepper)
        return ServedModel(name, version, model, info, images, stepper, load_ms=load_ms, warmup_ms=warmup_ms)

    def publish(self, entry: ServedModel) -> ServedModel | None:
        """Serve a prepared entry beside the other versions (atomically); returns the entry it
        replaced (the same name and version), whose holders finish on it."""
        with self._lock:
            versions = self._table.get(entry.name, {})
            replaced = versions.get(entry.version)
            self._table = {**self._table, entry.name: {**versions, entry.version: entry}}
        self._log_loaded(entry, replaced=replaced is not None, retired=[])
        return replaced

    def _load_file(self, name: str, path: Path) -> tuple[LoadedModel, ImageGenerator | None, IterativeImages | None, float, float]:
        """Read, check and warm up one file (before any lock: serving never waits on a file)."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ValueError(f"model name {brief_repr(name, 80)} does not match {NAME_PATTERN.pattern}")
        if not self._served_kind(path):
            raise ModelFileError(path, f"kind {read_header(path)[1].get('kind')!r} is not served (evaluation only)")
        t0 = time.perf_counter()
        model = load_model(path, self.device)
        t1 = time.perf_counter()
        images = ImageGenerator(model, self.image_limits) if model.spec.shape is Shape.ONE_SHOT else None
        stepper = IterativeImages(model, self.image_limits) if model.spec.shape is Shape.ITERATIVE else None
        self._warm_up(model, images, stepper)
        t2 = time.perf_counter()
        return model, images, stepper, round(1000 * (t1 - t0), 1), round(1000 * (t2 - t1), 1)

    def _log_loaded(self, entry: ServedModel, *, replaced: bool, retired: list[int]) -> None:
        log.info(
            "model_loaded",
            name=entry.name,
            version=entry.version,
            kind=entry.kind,
            parameters=entry.info.parameters,
            device=str(self.device),
            path=str(entry.path),
            load_ms=entry.load_ms,
            warmup_ms=entry.warmup_ms,
            replaced=replaced,
            retired=retired,
        )

    def unload(self, name: str, version: int | None = None) -> list[ServedModel]:
        """Stop serving a model (all versions, or one); in-flight holders finish. Raises ModelNotFound."""
        with self._lock:
            versions = self._versions(self._table, name)
            gone = set(versions) if version is None else {self._version(name, versions, version).version}
            entries = [versions[v] for v in sorted(gone)]
            remaining = {v: e for v, e in versions.items() if v not in gone}
            table = {k: v for k, v in self._table.items() if k != name}
            if remaining:
                table[name] = remaining
            self._table = table
        log.info("model_unloaded", name=name, versions=[e.version for e in entries])
        return entries

    def _warm_up(self, model: LoadedModel, images: ImageGenerator | None, stepper: IterativeImages | None) -> None:
        """One small forward pass, so the first request does not pay for lazy initialisation; for an
        image model, also the batch-invariance probe (three tile-sized passes)."""
        if images is not None:
            images.generate([ImageRequest(n=1, seed=0)])  # the engine's own path, uint8 conversion included
            if self.device.type == "cpu" and images.graph() is None:  # served eagerly: right, only slower beside a busy loop
                log.warning(
                    "image_graph_unavailable",
                    model=model.name,
                    detail="TorchScript could not run this model's batch as one graph equal to the eager forward; "
                    "its batches run op by op (engine/image_graph.py)",
                )
            if not images.batch_invariant():  # served anyway: the samples are right, only not bit-stable
                log.warning(
                    "batch_invariance_not_held",
                    model=model.name,
                    detail="a sample's floats depend on its place in a batch on this machine's kernels "
                    "(narrow layers); a seed still gives the same images but for a rare uint8 level",
                )
        elif stepper is not None:  # one request of the fewest steps, through the engine's own step batch
            batch = StepBatch(stepper, max_pending=1)
            batch.add(ImageRequest(n=1, seed=0, steps=stepper.steps.low))
            while batch.has_work:
                batch.step()
        elif model.spec.text:
            with torch.inference_mode():
                model.module(torch.zeros((1, 1), dtype=torch.long, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _info(self, name: str, version: int, model: LoadedModel, stepper: IterativeImages | None) -> ModelInfo:
        cfg = model.config
        image: ImageInfo | None = None
        text: TextInfo | None = None
        if model.spec.images:
            c = cfg.num_classes
            image = ImageInfo(
                max_n=self.image_limits.max_n if stepper is None else stepper.max_n,
                image_size=cfg.image_size,
                latent_dim=cfg.latent_dim,
                conditional=c > 0,
                labels_accepted=c > 0,
                label_range=(0, c - 1) if c > 0 else None,
                steps=None if stepper is None else stepper.steps,
            )
        elif model.spec.text and model.vocab is not None:
            text = TextInfo(vocab=model.vocab, context_window=cfg.block_size)
        return ModelInfo(
            name=name,
            version=version,
            kind=model.kind,
            summary=model.spec.summary,
            parameters=sum(p.numel() for p in model.module.parameters()),
            device=str(self.device),
            latest=True,
            image=image,
            text=text,
        )

    # -- lookups (from requests: never trusted) ---------------------------------------------------

    def get(self, name: object, version: object | None = None) -> ServedModel:
        """The entry for ``name`` at ``version`` (the latest when None); raise ModelNotFound."""
        table = self._table  # one read: a consistent snapshot even while a swap publishes
        versions = self._versions(table, name)
        if version is None:
            return versions[max(versions)]
        return self._version(name, versions, version)

    @staticmethod
    def _versions(table: dict[str, dict[int, ServedModel]], name: object) -> dict[int, ServedModel]:
        # A dict key and nothing else: a name is never joined to a path.
        versions = table.get(name) if isinstance(name, str) else None
        if not versions:
            raise ModelNotFound(name, None, sorted(table))
        return versions

    @staticmethod
    def _version(name: object, versions: dict[int, ServedModel], version: object) -> ServedModel:
        entry = versions.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
        if entry is None:
            raise ModelNotFound(name, version, [str(v) for v in sorted(versions)])
        return entry

    def list_models(self) -> list[ModelInfo]:
        """Every served version, by name then version; ``latest`` marks what an unversioned lookup gets."""
        table = self._table
        out: list[ModelInfo] = []
        for name in sorted(table):
            versions = table[name]
            top = max(versions)
            out.extend(replace(versions[v].info, latest=v == top) for v in sorted(versions))
        return out

    def served(self) -> list[ServedModel]:
        """Every served version's entry, by name then version."""
        table = self._table
        return [table[name][v] for name in sorted(table) for v in sorted(table[name])]

    def names(self) -> list[str]:
        return sorted(self._table)

    def __len__(self) -> int:
        return sum(len(v) for v in self._table.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._table
