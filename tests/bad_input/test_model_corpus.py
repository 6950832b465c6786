"""Malformed model files (issue 6): a corpus of them (``tests/bad_input/model_corpus.py``, built into a tmp
folder at test time) next to good tiny models.

- The registry refuses each bad file with a LoadFailure naming the file and its own reason (and
  ``load_model`` raises a ModelFileError naming the file), serves every good model, and never
  unpickles anything or allocates what a header claims.
- A server on the folder serves only the good models, logs each refused file with its reason, and
  answers NOT_FOUND for the name of every refused file.
- Model names from requests never reach the file system: traversal names are NOT_FOUND, and no file
  is opened, stat'ed or listed while they are looked up (checked by wrapping the file-system entry
  points of ``builtins``/``io``/``os`` and the loaders of ``engine.modelfile``/``engine.registry``
  for the duration of the requests; safetensors' Rust ``safe_open`` is only reachable through
  ``load_model``, which is wrapped too).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.modelfile
import engine.registry
from engine.errors import ModelFileError, ModelNotFound
from engine.logs import configure_logging
from engine.modelfile import export_model, load_model
from engine.registry import FolderReport, ModelRegistry
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.bad_input.model_corpus import CASES, GOOD, SKIPPED, VOCAB, Case, Corpus, build_corpus, tiny_text, tiny_vae
from tests.serving import ServerThread

pytestmark = [pytest.mark.timeout(300)]

SC = grpc.StatusCode


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "models")


@dataclass
class Loaded:
    registry: ModelRegistry
    report: FolderReport
    seconds: float
    peak_growth_mb: float  # growth of the process's peak resident memory while loading


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.fixture(scope="module")
def loaded(corpus: Corpus) -> Loaded:
    registry = ModelRegistry()
    peak, started = peak_rss_mb(), time.perf_counter()
    report = registry.load_folder(corpus.folder)
    return Loaded(registry, report, time.perf_counter() - started, peak_rss_mb() - peak)


def expected_served() -> set[tuple[str, int, str]]:
    return {(name, version, kind) for name, (_, kind, version) in GOOD.items()}


# -- the registry ----------------------------------------------------------------------------------


def test_the_corpus_has_every_kind_of_damage(corpus: Corpus) -> None:
    assert len(CASES) >= 10
    assert len({c.file for c in CASES}) == len(CASES)
    assert all(os.path.lexists(corpus.path(c)) for c in CASES)
    words = " ".join(c.what for c in CASES)
    for damage in ("cut", "random", "pickle", "3 GiB", "shape", "float16", "missing", "unknown kind", "future format", "path separator"):
        assert damage in words, damage


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_each_bad_file_is_refused_with_its_file_and_reason(corpus: Corpus, loaded: Loaded, case: Case) -> None:
    path = corpus.path(case)
    failures = [f for f in loaded.report.failures if f.path == path]
    assert len(failures) == 1, f"{case.what}: {path.name} was not refused"
    reason = failures[0].reason
    assert re.search(case.reason, reason), f"{case.what}: {reason!r}"
    tensor = corpus.tensor(case)
    if tensor == "*":
        assert re.match(r"tensor '[^']+': ", reason), reason
    elif tensor is not None:
        assert reason.startswith(f"tensor {tensor!r}: "), reason
    else:
        assert not reason.startswith("tensor "), reason
    if case.content:  # load_model alone refuses it too, naming the file (and the tensor)
        with pytest.raises(ModelFileError) as info:
            load_model(path)
        e = info.value
        assert e.path == str(path) and str(e).startswith(f"{path}: ")
        assert reason == (f"tensor {e.tensor!r}: {e.reason}" if e.tensor else e.reason)


def test_the_good_models_are_served_and_only_they(corpus: Corpus, loaded: Loaded) -> None:
    registry, report = loaded.registry, loaded.report
    assert {(m.name, m.version, m.kind) for m in registry.list_models()} == expected_served()
    assert sorted(f.path.name for f in report.failures) == sorted(c.file for c in CASES)
    assert [p.name for p in report.skipped] == [SKIPPED]
    assert registry.failures == report.failures
    assert all(f.path.parent == corpus.folder for f in report.failures)


def test_nothing_was_unpickled_and_no_header_was_believed(corpus: Corpus, loaded: Loaded) -> None:
    """The pickles would create marker folders if loaded; headers claiming gigabytes (and a config
    claiming a 10**9-wide layer) cost neither memory nor time."""
    assert list(corpus.markers.iterdir()) == []
    assert loaded.seconds < 30
    assert loaded.peak_growth_mb < 512, f"loading the corpus raised peak memory by {loaded.peak_growth_mb:.0f} MB"


def test_a_model_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    vae, text = tiny_vae(), tiny_text()
    with torch.no_grad():
        next(iter(vae.parameters()))[0, 0] = float("nan")
        next(iter(text.parameters()))[0, 0] = float("inf")
    export_model(tmp_path / "nan.safetensors", "vae", vae)
    export_model(tmp_path / "inf.safetensors", "char-transformer", text, vocab=VOCAB)
    registry = ModelRegistry()
    report = registry.load_folder(tmp_path)
    reasons = {f.path.name: f.reason for f in report.failures}
    assert registry.names() == [] and set(reasons) == {"nan.safetensors", "inf.safetensors"}, reasons


# -- a server on the corpus ----------------------------------------------------------------------------


@dataclass
class Served:
    server: ServerThread
    stub: pb_grpc.GeneratorStub
    events: list[dict[str, Any]]  # the JSON log lines of its start-up


@pytest.fixture(scope="module")
def served(corpus: Corpus) -> Iterator[Served]:
    logs = io.StringIO()
    real, sys.stderr = sys.stderr, logs
    try:
        configure_logging("json")  # binds structlog to the sys.stderr of the moment: ``logs``
    finally:
        sys.stderr = real
    try:
        with ServerThread(models_dir=str(corpus.folder)) as server, grpc.insecure_channel(server.address) as channel:
            configure_logging("console")
            events = [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]
            yield Served(server, pb_grpc.GeneratorStub(channel), events)
    finally:
        configure_logging("console")


def code_of(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str, list[pb.GenerateResponse]]:
    messages: list[pb.GenerateResponse] = []
    try:
        for message in stub.Generate(request, timeout=30):
            messages.append(message)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", messages
    return SC.OK, "", messages


def requests_for(name: str, version: int = 0) -> list[pb.GenerateRequest]:
    return [
        pb.GenerateRequest(model=name, version=version, image=pb.ImageParams(n=1, seed=0)),
        pb.GenerateRequest(model=name, version=version, text=pb.TextParams(prompt="ab", max_new_tokens=2, seed=0)),
    ]


def test_a_server_serves_the_good_models_and_names_the_refused_files(corpus: Corpus, served: Served) -> None:
    stub = served.stub
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert {(m.name, m.version, m.kind) for m in listed} == expected_served()

    code, _, messages = code_of(stub, pb.GenerateRequest(model="good", image=pb.ImageParams(n=3, seed=1)))
    assert code == SC.OK and messages[-1].finish.n_generated == 3
    code, _, messages = code_of(stub, pb.GenerateRequest(model="good-gan", image=pb.ImageParams(n=2, seed=1, labels=[7])))
    assert code == SC.OK and [list(m.images.labels) for m in messages[:-1]] == [[7, 7]]
    code, _, messages = code_of(stub, pb.GenerateRequest(model="good.text", text=pb.TextParams(prompt="ab", max_new_tokens=5, seed=1)))
    assert code == SC.OK and (messages[-1].finish.version, messages[-1].finish.n_generated) == (2, 5)
    assert code_of(stub, pb.GenerateRequest(model="good.text", version=1, text=pb.TextParams(prompt="ab")))[0] == SC.NOT_FOUND

    refused = {e["path"]: e["reason"] for e in served.events if e.get("event") == "model_refused"}
    assert sorted(refused) == sorted(str(corpus.path(c)) for c in CASES)
    for case in CASES:
        assert re.search(case.reason, refused[str(corpus.path(case))]), case.file
    ready = next(e for e in served.events if e.get("event") == "server_ready")
    assert sorted(ready["refused"]) == sorted(refused)
    assert sorted(ready["models"]) == sorted(f"{name}@{version}" for name, (_, _, version) in GOOD.items())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_a_refused_file_is_not_found(served: Served, case: Case) -> None:
    stem = case.file.removesuffix(".safetensors")
    name, at, _ = stem.rpartition("@")
    names = {stem, name} if at else {stem}
    if case.file == "good@1.safetensors":  # its name is served, from good.safetensors: not from this file
        names = {stem}
    for model in names:
        for request in requests_for(model):
            code, details, _ = code_of(served.stub, request)
            assert code == SC.NOT_FOUND and "is not served" in details, (model, code, details)


# -- names from requests never reach the file system ----------------------------------------------------

WATCHED: list[tuple[Any, str]] = [
    (builtins, "open"),
    (io, "open"),
    (os, "open"),
    (os, "stat"),
    (os, "lstat"),
    (os, "listdir"),
    (os, "scandir"),
    (os, "readlink"),
    (os, "access"),
    (engine.modelfile, "load_model"),
    (engine.modelfile, "read_header"),
    (engine.modelfile, "safe_open"),
    (engine.registry, "load_model"),
    (engine.registry, "read_header"),
]


@contextmanager
def file_system_calls() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record (and let through) every call of the file-system entry points while the block runs,
    but the model watcher's: a served fixture's server scans its folder from its loader thread
    every few seconds (that is the feature), and once such a scan landed in a lookup's block (a
    fresh-clone CI run). Calls on any other thread count, the server's loop and engine included."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    originals = [(module, name, getattr(module, name)) for module, name in WATCHED]

    def recording(label: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not threading.current_thread().name.startswith("model-loader"):  # server/runtime/model_watch.py's scans
                calls.append((label, args))
            return original(*args, **kwargs)

        return wrapper

    for module, name, original in originals:
        setattr(module, name, recording(f"{module.__name__}.{name}", original))
    try:
        yield calls
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def traversal_names(corpus: Corpus) -> list[str]:
    """Names a path join would resolve to real model files (or to things worse than files)."""
    relative = [
        "../outside",
        "..",
        ".",
        "/",
        "sub/inner",
        "sub",
        "inner",
        "outside",
        "markers",
        "good/../good",
        "./good",
        "good/",
        "good/.",
        "%2e%2e%2foutside",
        "..%2Foutside",
        "..\\outside",
        "good.safetensors",
        "good@1",
        "good.text@2",
        "GOOD",
        "good\x00",
        "good\x00.safetensors",
        " good",
        "good\n",
        "~/good",
        "file:good",
        "models/good",
        "mnist_classifier",
        "fifo",
        "folder",
        "dangling",
    ]
    absolute = [corpus.outside, corpus.outside.with_suffix(""), corpus.nested, corpus.folder / "good", corpus.folder / "fifo.safetensors"]
    return relative + [str(p) for p in absolute] + ["/etc/passwd", "/dev/zero", "/proc/self/environ"]


def test_request_names_never_reach_the_file_system(corpus: Corpus, served: Served) -> None:
    names = traversal_names(corpus)
    results = {}
    with file_system_calls() as calls:
        for name in names:
            for version in (0, 1):
                for request in requests_for(name, version):
                    results[name, version, request.WhichOneof("params")] = code_of(served.stub, request)[:2]
    assert calls == [], f"the file system was touched while looking names up: {calls[:10]}"
    wrong = {key: value for key, value in results.items() if value[0] != SC.NOT_FOUND}
    assert wrong == {}
    assert code_of(served.stub, requests_for("good")[0])[0] == SC.OK  # the control


NAME_CHARS = "./\\%2eE@~:-_ \x00goodutsiner"


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.one_of(st.text(NAME_CHARS, max_size=24), st.text(max_size=24), st.sampled_from(list(GOOD))),
    version=st.one_of(st.none(), st.integers(0, 4), st.integers(-(2**63), 2**64)),
)
def test_no_lookup_touches_the_file_system(loaded: Loaded, name: str, version: int | None) -> None:
    registry = loaded.registry
    with file_system_calls() as calls:
        try:
            entry = registry.get(name, version)
        except ModelNotFound:
            entry = None
    assert calls == []
    served = name in GOOD and version in (None, GOOD[name][2])
    assert (entry is not None) == served, (name, version)
    if entry is not None:
        assert (entry.name, entry.version, entry.path.name) == (name, GOOD[name][2], GOOD[name][0])
