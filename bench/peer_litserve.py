"""LitServe's API classes for the VAE and text peers (bench/peer_apps.py): at module level, since LitServe pickles them into its worker."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litserve as ls

from bench.peer_apps import Decoder, HFText, TextAsk, seed_of, sse, text_ask


class VAEAPI(ls.LitAPI):  # type: ignore[misc]
    settings: tuple[Path, int, int]  # models_dir, torch threads, max batch: set before the server starts

    def setup(self, device: str) -> None:
        self.decoder = Decoder(*self.settings)

    def decode_request(self, request: dict[str, Any]) -> int:  # annotated: LitServe reads the body as JSON
        return seed_of(request)

    def predict(self, seeds: Any) -> list[dict[str, Any]]:  # batched: a list of seeds
        return self.decoder.decode(list(seeds))

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


class TextStreamAPI(ls.LitAPI):  # type: ignore[misc]
    """Streaming text (``LitAPI(stream=True)``): ``predict`` yields what a ``TextIteratorStreamer`` yields."""

    settings: tuple[Path, int]  # models_dir, torch threads

    def setup(self, device: str) -> None:
        self.model = HFText(*self.settings)

    def decode_request(self, request: dict[str, Any]) -> TextAsk:
        ask = text_ask(request)
        self.model.ids(ask.prompt)  # outside the vocabulary: refused here
        return ask

    def predict(self, ask: TextAsk) -> Iterator[str]:
        yield from self.model.stream(ask)

    def encode_response(self, output: Iterator[str]) -> Any:  # not Iterator[str]: LitServe makes its response model of this
        for text in output:
            if text:
                yield sse({"text": text})
        yield sse("[DONE]")


class TextBatchAPI(ls.LitAPI):  # type: ignore[misc]
    """Batched text: one ``generate`` per batch (HFText.complete), whole completions as JSON."""

    settings: tuple[Path, int]

    def setup(self, device: str) -> None:
        self.model = HFText(*self.settings)

    def decode_request(self, request: dict[str, Any]) -> TextAsk:
        ask = text_ask(request)
        self.model.ids(ask.prompt)
        return ask

    def predict(self, asks: Any) -> list[dict[str, str]]:  # batched: a list of asks
        return [{"text": t} for t in self.model.complete(list(asks))]

    def encode_response(self, output: dict[str, str]) -> Any:
        return output
