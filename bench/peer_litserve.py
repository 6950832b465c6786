"""LitServe's API class for the VAE peer (bench/peer_apps.py): at module level, since LitServe pickles it into its worker."""

from pathlib import Path
from typing import Any

import litserve as ls

from bench.peer_apps import Decoder, seed_of


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
