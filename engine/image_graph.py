# ruff: noqa: UP006, UP035, UP045  (TorchScript needs typing.List, Optional and Tuple in _Tiles' signatures)
"""An image model's tiled forward pass and its uint8 levels as ONE TorchScript graph (CPU).

The engine runs image batches on a thread beside the server's event loop, and an eager forward
gives up the GIL around each of its ~35 torch ops and must win it back from the loop after each;
the graph gives it up once a batch. It runs exactly the eager ops (the model traced at one tile's
shape, called once a tile; ``x * 255 + 0.5``, clamped, truncated as ``ImageGenerator._to_uint8``
rounds), and is checked bit for bit against the eager path when built, and not used where it
differs. Run it under ``optimized_execution(False)``: the profiling executor may fuse or rewrite
ops after a few calls, and then the floats need not be bit-equal to eager.

Why: docs/design/tiling.md
"""

# No ``from __future__ import annotations`` here: TorchScript reads _Tiles' annotations as objects.
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import List, Optional, Tuple  # TorchScript reads typing's forms (see the ruff line at the top)

import torch
from torch import nn
from torch.jit._fuser import optimized_execution

# The eager path, what a graph must equal: (z, labels) -> (floats, levels); (seed, total, offset, n) -> (z, labels).
Reference = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
Draw = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor | None]]


class _OneTile(nn.Module):
    """The model on one tile of (z, labels): a module (not a closure) so tracing keeps the
    weights as parameters; ``labels`` is ignored by an unconditional model."""

    def __init__(self, module: nn.Module, conditional: bool) -> None:
        super().__init__()
        self.model = module
        self.conditional = conditional

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        given = labels if self.conditional else None
        out: torch.Tensor = self.model(z, given)
        return out


class _Tiles(nn.Module):
    """Every tile of a batch through the traced tile, then the levels: (floats, uint8 levels);
    ``seeded`` draws the batch's latents first, as ``ImageGenerator.draw`` does."""

    tile: int
    conditional: bool
    latent_dim: int
    num_classes: int

    def __init__(self, one_tile: torch.jit.ScriptModule, tile: int, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.one_tile = one_tile
        self.tile = tile
        self.conditional = num_classes > 0
        self.latent_dim = latent_dim
        self.num_classes = num_classes

    @torch.jit.export
    def seeded(
        self,
        seeds: List[int],
        totals: List[int],
        offsets: List[int],
        ns: List[int],
        gen: torch.Generator,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows offsets[i] .. offsets[i] + ns[i] - 1 of each request's block, drawn from its seed
        (the whole block: z, then a conditional model's labels), then ``forward``."""
        rows = 0
        for n in ns:
            rows += n
        z = torch.empty([rows, self.latent_dim])
        labels = torch.zeros([rows], dtype=torch.long)
        a = 0
        for i in range(len(seeds)):
            gen.manual_seed(seeds[i])
            n, o, total = ns[i], offsets[i], totals[i]
            if o == 0 and n == total and not self.conditional:
                # A whole request (the usual one-image case) is drawn straight into its rows: randn is
                # ``empty(...).normal_(0, 1, gen)`` on rows as contiguous as these, so the draw is the
                # same (build_graph checks it bit for bit) in 3 ops instead of 5 (docs/design/tiling.md).
                z[a : a + n].normal_(0.0, 1.0, generator=gen)
            else:
                block = torch.randn([total, self.latent_dim], generator=gen)
                z[a : a + n] = block[o : o + n]
                if self.conditional:
                    labels[a : a + n] = torch.randint(0, self.num_classes, [total], generator=gen)[o : o + n]
            a += n
        x, levels = self.forward(z, labels)
        return x, levels, labels

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        total = z.size(0)
        lab = labels if labels is not None and self.conditional else torch.zeros(total, dtype=torch.long)
        t = self.tile
        pad = (t - total % t) % t
        if pad > 0:  # the last tile padded with zeros: every call sees exactly ``tile`` rows
            z = torch.cat([z, z.new_zeros((pad, z.size(1)))])
            lab = torch.cat([lab, lab.new_zeros(pad)])
        if total + pad == t:
            x = self.one_tile(z, lab)[:total]
        else:
            first = self.one_tile(z[:t], lab[:t])
            x = first.new_empty((total + pad, first.size(1)))
            x[:t] = first
            for a in range(t, total + pad, t):
                x[a : a + t] = self.one_tile(z[a : a + t], lab[a : a + t])
            x = x[:total]
        return x, self.levels(x)

    @torch.jit.export
    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> uint8 as ImageGenerator._to_uint8 rounds on the CPU: clamped, times 255 plus
        0.5 in float32 (two ops, as numpy's two passes: no fused multiply-add), truncated."""
        y = x.clamp(0.0, 1.0)  # a copy: x (the floats) is returned as the model gave it
        y.mul_(255.0)
        y.add_(0.5)
        return y.to(torch.uint8)


class ImageGraph:
    """``(z, labels) -> (floats (B, size*size), uint8 levels (B, size*size))`` for CPU tensors.

    One tensor each, not a list of the chunks': a list as the graph's argument made the call wait
    on the GIL as long as the eager forward did (docs/design/tiling.md), so the caller
    concatenates them first (one op)."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        self._graph = graph

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with optimized_execution(False), torch.inference_mode():
            x, levels = self._graph(z, labels)
        return x, levels

    def seeded(
        self, seeds: list[int], totals: list[int], offsets: list[int], ns: list[int], gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunks given by seed, block size, offset and rows: (floats, levels, labels drawn (conditional models))."""
        with optimized_execution(False), torch.inference_mode():
            x, levels, labels = self._graph.seeded(seeds, totals, offsets, ns, gen)
        return x, levels, labels

    def _levels(self, x: torch.Tensor) -> torch.Tensor:
        """The graph's rounding alone (tests hold it to numpy's)."""
        with optimized_execution(False), torch.inference_mode():
            return self._graph.levels(x)


_graphs: weakref.WeakKeyDictionary[nn.Module, dict[int, ImageGraph | None]] = weakref.WeakKeyDictionary()
_graphs_lock = threading.Lock()


def image_graph(module: nn.Module, tile: int, build: Callable[[], ImageGraph | None]) -> ImageGraph | None:
    """The graph of ``module`` at ``tile`` rows: ``build()`` once per module and tile (~0.1 s),
    then shared by every ImageGenerator of that module, and dropped with it (weakly keyed)."""
    with _graphs_lock:
        known = _graphs.setdefault(module, {})
        if tile not in known:
            known[tile] = build()
        return known[tile]


def build_graph(
    module: nn.Module,
    *,
    latent_dim: int,
    num_classes: int,
    tile: int,
    reference: Reference,
    draw: Draw,
) -> ImageGraph | None:
    """``module``'s graph at ``tile`` rows; None where TorchScript cannot trace the model or the
    graph's results differ from ``reference`` (the eager path: ``(z, labels) -> (floats, levels)``)
    or its draws from ``draw`` (``(seed, total, offset, n) -> (z, labels)``, eagerly) in one bit
    (a warning says so: the eager path then serves, only slower beside a busy loop)."""
    conditional = num_classes > 0
    try:
        with warnings.catch_warnings(), optimized_execution(False), torch.no_grad():
            warnings.simplefilter("ignore")  # torch 2.x calls torch.jit deprecated; the tracer warns of what the check below settles
            example = (torch.zeros(tile, latent_dim), torch.zeros(tile, dtype=torch.long))
            one_tile = torch.jit.trace(_OneTile(module, conditional), example, check_trace=False)
            graph = ImageGraph(torch.jit.script(_Tiles(one_tile, tile, latent_dim, num_classes)))
        gen = torch.Generator().manual_seed(0)
        for rows in sorted({1, tile, 2 * tile + 3}):
            z = torch.randn((rows, latent_dim), generator=gen)
            labels = torch.randint(0, max(num_classes, 1), (rows,), generator=gen)
            want_x, want_levels = reference(z, labels if conditional else None)
            x, levels = graph(z, labels if conditional else None)
            if not (torch.equal(x, want_x) and torch.equal(levels, want_levels)):
                raise ValueError(f"results differ from the eager forward at {rows} rows")
        # latents drawn inside: whole requests, and the middle rows of a split one (seeds up to 2**63 - 1)
        pieces = [(2**63 - 1, 2, 0, 2), (7, 1, 0, 1), (12345, 2 * tile + 3, tile, tile + 1)]
        seeds, totals, offsets, ns = (list(column) for column in zip(*pieces, strict=True))
        x, levels, drawn = graph.seeded(seeds, totals, offsets, ns, torch.Generator())
        zs, ls = zip(*(draw(*piece) for piece in pieces), strict=True)
        want_z = torch.cat(zs)
        want_labels = torch.cat([lab for lab in ls if lab is not None]) if conditional else None
        want_x, want_levels = reference(want_z, want_labels)
        if not (torch.equal(x, want_x) and torch.equal(levels, want_levels) and (want_labels is None or torch.equal(drawn, want_labels))):
            raise ValueError("results of latents drawn inside the graph differ from the eager draw and forward")
    except Exception as e:  # the eager path gives the same results, only slower beside a busy event loop
        warnings.warn(f"image model runs eagerly: no TorchScript graph ({type(e).__name__}: {e})", stacklevel=4)
        return None
    return graph
