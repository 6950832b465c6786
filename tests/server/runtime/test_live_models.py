"""Live models (server/runtime/model_watch.py): files dropped into, rewritten in and removed from the models
folder of a running server, under a steady load of plain and stream calls, with no failed request."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from engine.faults import Faults
from engine.images import ImageRequest
from engine.modelfile import export_model
from engine.models.gan import GANConfig, Generator
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from engine.registry import DEFAULT_MODELS_DIR, ModelRegistry, ServedModel
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.runtime.app import GenServer
from server.runtime.model_watch import ModelWatcher
from tests.serving import running_server

pytestmark = pytest.mark.timeout(60)

VOCAB = "\nabc"
POLL_S = 0.05  # small, so that the tests are quick; settle_s is the same, so a file loads at its second scan at the latest
SEED = 3  # the image requests' seed: each version draws its own pixels from it


def tiny_vae(seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(hidden_dim=8, latent_dim=3))


def tiny_gan() -> Generator:
    torch.manual_seed(0)
    return Generator(GANConfig(latent_dim=4, arch="mlp", mlp_hidden=8, num_classes=10))


def tiny_text(seed: int) -> CharTransformer:
    torch.manual_seed(seed)
    return CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, d_model=8, d_ff=16))


def write_model(path: Path, module: nn.Module) -> Path:
    kinds = {VAE: "vae", Generator: "wgan-gp", CharTransformer: "char-transformer"}
    return export_model(path, kinds[type(module)], module, vocab=VOCAB if isinstance(module, CharTransformer) else None)


def publish(folder: Path, file_name: str, module: nn.Module) -> Path:
    """The safe recipe: write beside the folder (same file system), then rename into it."""
    written = write_model(folder.parent / "staging" / file_name, module)
    target = folder / file_name
    os.replace(written, target)
    return target


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll an async condition (a ListModels call, say) until it holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def image(model: str = "vae", version: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, version=version, image=pb.ImageParams(n=2, seed=SEED))


def text(version: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="text", version=version, text=pb.TextParams(prompt="ab", max_new_tokens=4, seed=1))


def pixels_of(chunks: list[pb.Images]) -> np.ndarray:
    return np.concatenate(
        [np.frombuffer(c.pixels, np.uint8).reshape(c.count, c.height, c.width) for c in sorted(chunks, key=lambda c: c.offset)]
    )


def expected_pixels(path: Path, device: torch.device | str = "cpu") -> np.ndarray:
    entry = ModelRegistry(device).load(path)
    assert entry.images is not None
    return entry.images.generate([ImageRequest(n=2, seed=SEED)])[0].pixels


async def served(stub: pb_grpc.GeneratorStub) -> dict[str, tuple[list[int], int]]:
    """model -> (versions, latest)."""
    out: dict[str, tuple[list[int], int]] = {}
    for m in (await stub.ListModels(pb.ListModelsRequest())).models:
        versions, latest = out.get(m.name, ([], 0))
        out[m.name] = ([*versions, m.version], m.version if m.latest else latest)
    return out


def watcher(server: GenServer) -> ModelWatcher:
    assert server.watcher is not None
    return server.watcher


def loads(server: GenServer, result: str) -> float:
    return server.metrics.registry.get_sample_value("genserve_model_loads_total", {"result": result}) or 0.0


class Load:
    """A steady load: plain Generate calls (latest and pinned versions) and one GenerateStream,
    each recording every request's Finish (or its failure) until stopped."""

    def __init__(self, stub: pb_grpc.GeneratorStub) -> None:
        self.stub = stub
        self.stop = asyncio.Event()
        self.finishes: list[tuple[str, pb.Finish, np.ndarray | None]] = []  # (what was asked, Finish, pixels)
        self.failures: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._plain(image(), "vae")),
            asyncio.create_task(self._plain(image(), "vae")),
            asyncio.create_task(self._plain(image(version=1), "vae@1")),
            asyncio.create_task(self._plain(text(), "text")),
            asyncio.create_task(self._stream()),
        ]

    def count(self, asked: str, version: int) -> int:
        return sum(1 for a, f, _ in self.finishes if a == asked and f.version == version)

    async def _plain(self, request: pb.GenerateRequest, asked: str) -> None:
        while not self.stop.is_set():
            try:
                messages = [m async for m in self.stub.Generate(request)]
            except grpc.aio.AioRpcError as e:
                self.failures.append(f"Generate {asked}: {e.code().name} {e.details()}")
                continue
            chunks = [m.images for m in messages if m.HasField("images")]
            self.finishes.append((asked, messages[-1].finish, pixels_of(chunks) if chunks else None))

    async def _stream(self) -> None:
        outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            while (message := await outbox.get()) is not None:
                yield message

        call = self.stub.GenerateStream(requests())
        wave = 0
        try:
            await call.read()  # the credit grant
            while not self.stop.is_set():
                wave += 1
                asked = {f"{wave}-img": "vae", f"{wave}-txt": "text"}
                await outbox.put(pb.StreamRequest(requests=[pb.GenerateRequest(id=f"{wave}-img", model="vae", image=image().image)]))
                await outbox.put(pb.StreamRequest(requests=[pb.GenerateRequest(id=f"{wave}-txt", model="text", text=text().text)]))
                chunks: dict[str, list[pb.Images]] = {}
                while asked:
                    response = await call.read()
                    assert response is not grpc.aio.EOF
                    for r in response.results:
                        if r.HasField("images"):
                            chunks.setdefault(r.id, []).append(r.images)
                        elif r.HasField("finish"):
                            what = asked.pop(r.id)
                            if r.finish.code:
                                self.failures.append(f"GenerateStream {what}: code {r.finish.code} {r.finish.message}")
                            else:
                                got = chunks.pop(r.id, [])
                                self.finishes.append((what, r.finish, pixels_of(got) if got else None))
        finally:
            await outbox.put(None)
            call.cancel()

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


@pytest.mark.asyncio
async def test_versions_and_models_come_and_go_under_load_without_a_failed_request(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    vae1 = publish(folder, "vae.safetensors", tiny_vae(1))
    publish(folder, "text.safetensors", tiny_text(1))
    async with (
        running_server(models_dir=str(folder), models_poll_s=POLL_S, models_settle_s=POLL_S, threads=1, batch_size=8) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GeneratorStub(channel)
        load = Load(stub)
        load.start()
        await wait_until(lambda: load.count("vae", 1) > 0 and load.count("text", 1) > 0)

        # a new version: loads beside the old one and becomes the latest
        vae2 = publish(folder, "vae@2.safetensors", tiny_vae(2))
        device = server.registry.device  # the same kernels as the server's
        reference = {1: expected_pixels(vae1, device), 2: expected_pixels(vae2, device)}
        await until(lambda: _is(stub, "vae", ([1, 2], 2)))
        assert watcher(server).known[vae2].scans <= 2  # within two poll intervals
        await wait_until(lambda: load.count("vae", 2) > 2)

        # a new model: gets its batcher under the supervisor, and its metrics
        gan = publish(folder, "digits.safetensors", tiny_gan())
        await until(lambda: _is(stub, "digits", ([1], 1)))
        assert watcher(server).known[gan].scans <= 2
        assert "batcher-digits" in server.supervisor.stages
        messages = [m async for m in stub.Generate(pb.GenerateRequest(model="digits", image=pb.ImageParams(n=3, labels=[7])))]
        assert (messages[-1].finish.model, messages[-1].finish.version, messages[-1].finish.n_generated) == ("digits", 1, 3)
        assert server.metrics.registry.get_sample_value("genserve_model_versions", {"model": "digits"}) == 1
        assert server.metrics.registry.get_sample_value("genserve_queue_depth", {"stage": "batcher-digits"}) is not None

        # a new text version, while text streams
        text2 = publish(folder, "text@2.safetensors", tiny_text(2))
        await until(lambda: _is(stub, "text", ([1, 2], 2)))
        await wait_until(lambda: load.count("text", 2) > 2)

        # corrupt files: refused by name, counted, and what was served keeps serving
        (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        good = vae2.read_bytes()
        (folder / "vae@3.safetensors").write_bytes(good[: len(good) // 2])  # truncated
        await wait_until(lambda: loads(server, "refused") == 2)
        assert await _is(stub, "vae", ([1, 2], 2)) and "broken" not in await served(stub)
        before = len(load.finishes)
        await wait_until(lambda: len(load.finishes) > before + 5)

        # removing the newest file makes the previous version the latest again
        vae2.unlink()
        await until(lambda: _is(stub, "vae", ([1], 1)))
        text2.unlink()  # sequences decoding on text@2 finish there; its decode thread stops after them
        await until(lambda: _is(stub, "text", ([1], 1)))
        # removing a model's last file retires it, stages and all
        gan.unlink()
        await until(lambda: _gone(stub, "digits"))
        await wait_until(lambda: "batcher-digits" not in server.supervisor.stages)
        before_vae, before_text = load.count("vae", 1), load.count("text", 1)
        await wait_until(lambda: load.count("vae", 1) > before_vae + 2 and load.count("text", 1) > before_text + 2)
        await load.finish()

    assert load.failures == []
    assert loads(server, "loaded") == 3
    # every Finish names the version that served it, and the pixels are that version's
    assert np.abs(reference[1].astype(int) - reference[2]).max() > 10  # the versions do differ
    for asked, finish, got in load.finishes:
        assert finish.code == 0 and finish.model == asked.split("@")[0]
        if asked == "vae@1":
            assert finish.version == 1
        if got is not None:
            assert np.abs(got.astype(int) - reference[finish.version]).max() <= 1, (asked, finish.version)
    assert {f.version for a, f, _ in load.finishes if a == "vae"} == {1, 2}
    assert {f.version for a, f, _ in load.finishes if a == "text"} == {1, 2}


async def _is(stub: pb_grpc.GeneratorStub, model: str, expected: tuple[list[int], int]) -> bool:
    return (await served(stub)).get(model) == expected


async def _gone(stub: pb_grpc.GeneratorStub, model: str) -> bool:
    return model not in await served(stub)


@pytest.mark.asyncio
@pytest.mark.parametrize(("grace_s", "finishes"), [(30.0, True), (0.2, False)])
async def test_a_request_in_flight_on_a_removed_version_finishes_there_or_fails_after_the_grace(
    tmp_path: Path, grace_s: float, finishes: bool
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    publish(folder, "text.safetensors", tiny_text(1))
    text2 = publish(folder, "text@2.safetensors", tiny_text(2))
    entered, release = threading.Event(), threading.Event()

    class Hold(Faults):  # pauses version 2's decode thread before its first step (the forward is one TorchScript graph: no hooks)
        def before_decode_step(self, served: ServedModel) -> None:
            if served.version == 2 and not release.is_set():
                entered.set()
                release.wait(10)

    async with (
        running_server(
            models_dir=str(folder), models_poll_s=POLL_S, models_settle_s=POLL_S, grace_s=grace_s, request_timeout_s=10
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GeneratorStub(channel)
        server.engine.install_faults(Hold())
        try:
            held = asyncio.create_task(_collect(stub, text()))  # the latest: version 2
            await wait_until(entered.is_set)
            text2.unlink()
            await until(lambda: _is(stub, "text", ([1], 1)))
            other = await _collect(stub, text())  # the previous version serves meanwhile, on its own thread
            assert (other[-1].finish.version, other[-1].finish.code) == (1, 0)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await _collect(stub, text(version=2))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            if finishes:
                assert not held.done()  # its version is retired, but it is still being served
                release.set()
                messages = await held
                assert (messages[-1].finish.version, messages[-1].finish.code, messages[-1].finish.n_generated) == (2, 0, 4)
            else:
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await held
                assert late.value.code() == grpc.StatusCode.UNAVAILABLE and "text version 2 was retired" in (late.value.details() or "")
        finally:
            release.set()
            server.engine.install_faults(None)
        await wait_until(lambda: not watcher(server)._retiring)
        assert "text-text" in server.supervisor.stages  # version 1 still needs the feeder


async def _collect(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [m async for m in stub.Generate(request)]


@pytest.mark.asyncio
async def test_a_file_loads_only_once_it_has_settled_and_temporary_names_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    publish(folder, "vae.safetensors", tiny_vae(1))
    complete = write_model(tmp_path / "elsewhere" / "vae@2.safetensors", tiny_vae(2)).read_bytes()
    async with running_server(models_dir=str(folder), models_poll_s=0, models_settle_s=1.0) as server:  # scans only when told
        w = watcher(server)
        await wait_until(lambda: w.scans >= 1)  # its first scan, at start; no other comes unless told
        now = [0.0]
        w.clock = lambda: now[0]
        growing = folder / "vae@2.safetensors"
        growing.write_bytes(complete[:1000])  # a copy in progress
        now[0] = growing.stat().st_mtime  # just written
        await w.scan()
        assert growing not in w.known and len(server.registry.served()) == 1 and loads(server, "refused") == 0
        with growing.open("ab") as f:
            f.write(complete[1000:])
        now[0] = growing.stat().st_mtime + 0.5  # still within the settle time of the last write
        await w.scan()
        assert growing not in w.known
        for temporary in (".vae@3.safetensors", "vae@4.safetensors.tmp", ".vae@5.safetensors.Xy12ab"):
            (folder / temporary).write_bytes(complete)
        now[0] += 10  # long quiet: settled
        await w.scan()
        assert [(e.name, e.version) for e in server.registry.served()] == [("vae", 1), ("vae", 2)]
        assert w.known[growing].scans == 2 and loads(server, "refused") == 0
        assert sorted(p.name for p in w.known) == ["vae.safetensors", "vae@2.safetensors"]


@pytest.mark.asyncio
async def test_a_rewrite_with_the_same_size_and_mtime_is_caught_by_its_checksum(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    path = publish(folder, "vae.safetensors", tiny_vae(1))
    old = path.stat()
    async with running_server(models_dir=str(folder), models_poll_s=0, models_settle_s=0.0) as server:
        w = watcher(server)
        await wait_until(lambda: w.scans >= 1)  # its first scan, at start; no other comes unless told
        first = server.registry.get("vae")
        await w.scan()
        assert server.registry.get("vae") is first  # nothing changed
        os.chmod(path, 0o600)  # ctime changes, the bytes do not
        await w.scan()
        assert server.registry.get("vae") is first and loads(server, "loaded") == 0
        staged = write_model(tmp_path / "elsewhere" / "vae.safetensors", tiny_vae(2))
        assert staged.stat().st_size == old.st_size
        os.utime(staged, ns=(old.st_atime_ns, old.st_mtime_ns))  # as `cp -p` or `rsync -t` would leave it
        os.replace(staged, path)
        await w.scan()
        second = server.registry.get("vae")
        assert second is not first and second.version == 1 and loads(server, "loaded") == 1
        assert np.abs(expected_pixels(path, server.registry.device).astype(int) - _pixels(second)).max() <= 1
        await wait_until(lambda: not w._retiring)  # the replaced entry is retired


def _pixels(entry: Any) -> np.ndarray:
    pixels: np.ndarray = entry.images.generate([ImageRequest(n=2, seed=SEED)])[0].pixels
    return pixels


def test_sighup_rescans_the_folder_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy2(DEFAULT_MODELS_DIR / "vae.safetensors", folder / "vae.safetensors")
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--log-format",
        "json",
        "--models-dir",
        str(folder),
    ]
    cmd += ["--models-poll-s", "0"]  # no polling: only SIGHUP scans
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        address = ""
        for line in proc.stderr:  # the ready line names the address; then the watcher's first scan is done
            if '"server_ready"' in line:
                address = json.loads(line)["address"]
            if '"models_watched"' in line:
                break
        else:
            raise AssertionError("the server exited before it watched its folder")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        shutil.copy2(DEFAULT_MODELS_DIR / "vae.safetensors", tmp_path / "vae@2.safetensors")  # mtime kept: settled
        os.replace(tmp_path / "vae@2.safetensors", folder / "vae@2.safetensors")
        proc.send_signal(signal.SIGHUP)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            deadline = time.monotonic() + 30
            while [(m.version, m.latest) for m in stub.ListModels(pb.ListModelsRequest()).models] != [(1, False), (2, True)]:
                assert time.monotonic() < deadline, "SIGHUP did not load vae@2"
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_served_model_does_not_change_when_its_file_is_overwritten_in_place(tmp_path: Path) -> None:
    path = write_model(tmp_path / "vae.safetensors", tiny_vae(1))
    entry = ModelRegistry().load(path)
    before = _pixels(entry)
    with path.open("r+b") as f:  # as `cp other.safetensors vae.safetensors` does: truncate, then write
        f.truncate(0)
        f.write(write_model(tmp_path / "other.safetensors", tiny_vae(2)).read_bytes())
    np.testing.assert_array_equal(_pixels(entry), before)  # a memory-mapped tensor would have changed (or faulted)
