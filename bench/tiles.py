"""What fixed-size tiles cost: the served image forward in tiles of T rows against the untiled one.

    python -m bench.tiles [--tiles 8,16,32,64] [--batches 1,8,32,128,256] [--rounds 15] [--threads 1]

``ImageGenerator.forward`` runs the model ``tile`` rows per call, padding the last tile, so a
sample's floats do not depend on its batch (issue #17). Each row of the table is one batch size;
each column the median time of the tiled forward over the untiled one (the model called once on
the whole batch, as before tiling), both under inference_mode, float output only. Contenders are
timed in shuffled rounds (``bench.engine.measure_rounds``) so that machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import torch

from bench.engine import MODELS, Contender, calibrate, measure_rounds, served_forward
from engine.images import ImageGenerator, ImageRequest
from engine.limits import ImageLimits
from engine.modelfile import load_model


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=ints, default=[8, 16, 32, 64], help="tile sizes in rows, one column each (default: 8,16,32,64)")
    parser.add_argument("--batches", type=ints, default=[1, 8, 32, 128, 256], help="batch sizes, one row each (default: 1,8,32,128,256)")
    parser.add_argument("--rounds", type=int, default=15, help="shuffled timing rounds per batch size (default: 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server's default on 2 cores; default: 1)")
    parser.add_argument("--models", default="vae,gan", help="image models of models/, comma-separated (default: vae,gan)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rng = random.Random(0)
    for name in args.models.split(","):
        loaded = load_model(Path(MODELS) / f"{name}.safetensors")
        bare = served_forward(loaded)
        print(f"{name} ({loaded.kind}; served tile {loaded.spec.tile}): tiled / untiled time, {args.threads} thread(s)")
        print(f"{'batch':>6} {'untiled ms':>11} " + " ".join(f"{'T' + str(t):>7}" for t in args.tiles))
        for b in args.batches:
            gen = ImageGenerator(loaded, ImageLimits(max_n=b, max_batch=b))
            chunk = gen.prepare(ImageRequest(n=b, seed=b))
            z, labels = chunk.z, chunk.labels
            assert z is not None  # prepare draws by default

            def untiled(z: torch.Tensor = z, labels: torch.Tensor | None = labels, bare: Callable[..., torch.Tensor] = bare) -> object:
                with torch.inference_mode():
                    return bare(z, labels)

            contenders = [Contender("untiled", untiled)]
            for t in args.tiles:
                tiled = ImageGenerator(loaded, ImageLimits(max_n=b, max_batch=b, tile=t))

                def run(g: ImageGenerator = tiled, z: torch.Tensor = z, labels: torch.Tensor | None = labels) -> object:
                    with torch.inference_mode():
                        return g.forward(z, labels)

                contenders.append(Contender(f"T{t}", run))
            for c in contenders:
                c.inner = calibrate(c.fn, 0.02, device)
            measure_rounds(contenders, args.rounds, device, rng)
            base = contenders[0].median
            print(f"{b:>6} {base * 1e3:>11.3f} " + " ".join(f"{c.median / base:>6.2f}x" for c in contenders[1:]), flush=True)


if __name__ == "__main__":
    main()
