"""Text-encoder call time: the ids-fed program (artifacts before token tables) against the token-fed one
plus the runtime's table lookup (runtime/token_tables.py), same random SD 1.5-size CLIP weights, one run.

    OMP_NUM_THREADS=1 python scripts/bench_text_encoder.py --formats pt2,aoti --repeat 30

Calls alternate between the two forms (back to back, order swapped each time) so that load on a shared
machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.artifact import _load
from sdexport.export import formats
from sdexport.export.modules import ShapeSpec, TextEncode, TextTokens
from sdexport.models.config import TextEncoderConfig
from sdexport.models.text_encoder import TextEncoder


def _call(program: Callable[..., torch.Tensor], form: str, ids: torch.Tensor,
          table: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One text-encoder call as the runtime makes it for each form."""
    if form == "ids":
        return lambda: program(ids)
    return lambda: program(F.embedding(ids, table))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="pt2")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rows", type=int, default=2, help="77-token rows per call (CFG batch 1: 2)")
    args = ap.parse_args()
    torch.manual_seed(0)
    te = TextEncoder(TextEncoderConfig()).eval()  # SD 1.5's CLIP ViT-L/14 text model, random weights
    spec = ShapeSpec(max_batch=max(1, args.rows // 2), min_size=512, max_size=512, max_chunks=1, multiple=64)
    width = te.config.hidden_size
    ids = torch.randint(0, 49407, (args.rows, 77))
    ids[:, 0], ids[:, -1] = 49406, 49407
    table = te.token_embedding.weight.detach().clone()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rows {args.rows}, repeat {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in args.formats.split(","):
            calls: dict[str, Callable[[], torch.Tensor]] = {}
            outs = {}
            for form, module, (ex, dyn) in (("ids", TextEncode(te), spec.text_encoder(torch.device("cpu"))),
                                            ("tokens", TextTokens(te),
                                             spec.text_encoder(torch.device("cpu"), width))):
                t0 = time.perf_counter()
                files = formats.write(fmt, f"{form}", module.eval(), ex, dyn, Path(tmp))
                program, _ = _load(fmt, Path(tmp), files, torch.device("cpu"), torch.get_num_threads())
                print(f"{fmt} {form}: built in {time.perf_counter() - t0:.1f} s", flush=True)
                calls[form] = _call(program, form, ids, table)
                outs[form] = calls[form]()
            diff = float((outs["ids"] - outs["tokens"]).abs().max())
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(3):
                for c in calls.values():
                    c()
            for i in range(args.repeat):  # back to back, in alternating order
                for k, c in list(calls.items())[:: 1 if i % 2 else -1]:
                    t0 = time.perf_counter()
                    c()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            low = {k: min(v) * 1e3 for k, v in times.items()}
            pairs = statistics.median(a / b for a, b in zip(times["tokens"], times["ids"], strict=True))
            print(f"{fmt}: ids-fed {med['ids']:.2f} ms (min {low['ids']:.2f}), token-fed + lookup "
                  f"{med['tokens']:.2f} ms (min {low['tokens']:.2f}), ratio of medians "
                  f"{med['tokens'] / med['ids']:.3f}, of minima {low['tokens'] / low['ids']:.3f}, median of "
                  f"back-to-back pairs {pairs:.3f}, "
                  f"max|diff| {diff:.1e}", flush=True)
        lookups = []
        for _ in range(1000):
            t0 = time.perf_counter()
            F.embedding(ids, table)
            lookups.append(time.perf_counter() - t0)
        print(f"the runtime's lookup alone (F.embedding, {args.rows}x77 of {tuple(table.shape)}): "
              f"median {statistics.median(lookups) * 1e6:.1f} us", flush=True)


if __name__ == "__main__":
    main()
