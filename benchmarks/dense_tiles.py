"""Tiled dense scanning (``convify.dense_map``) against one pass.

For resnet18 and vgg11 made dense (``replace_linear_head(dense=True)``), on
a random RGB uint8 image:

* at 2048x2048 (one pass fits): the one-pass time and peak memory, and per
  tile size (512, 1024 and the default) the tiled time, the time ratio, the
  halo's arithmetic overhead (input pixels computed over image pixels), the
  ratio of the two (target: time ratio at most 1.10x the overhead: tiling
  costs nothing beyond the halo it recomputes), the peak memory and the
  largest relative deviation from the one-pass map;
* at 8192x8192 (one pass would need ~17 GB for vgg11's first activation
  alone): the tiled time, peak memory and throughput in megapixels per second.

Each configuration runs in a fresh subprocess, so that its peak resident
memory (``ru_maxrss``) is its own; the process builds the model (weights
included in the peak) and the image, then runs. Times are of the run alone.

    python benchmarks/dense_tiles.py --sizes 2048 --models resnet18
    python benchmarks/dense_tiles.py --sizes 8192 --write

With ``--write`` the table replaces its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TILES = {2048: ["one-pass", "512", "1024", "default"], 8192: ["default"]}


def child(model_name: str, size: int, mode: str, threads: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    import torchvision

    import convify
    from convify.dense import scan, tile_plan

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    dense = convify.replace_linear_head(model, torch.randn(1, 3, 224, 224), dense=True)
    del model
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    row: dict = {"model": model_name, "size": size, "mode": mode}
    with torch.no_grad():
        if mode == "one-pass":
            start = time.perf_counter()
            out = dense(image[None].float() / 255)
            row["seconds"] = time.perf_counter() - start
        else:
            tile = None if mode == "default" else int(mode)
            plan = tile_plan(dense, (size, size), tile)
            start = time.perf_counter()
            result = scan(dense, image, tile=tile, progress=False)
            row["seconds"] = time.perf_counter() - start
            out = result.scores
            row.update(tile=plan.tile[0], tiles=len(plan.tiles), overhead=plan.overhead,
                       batch_size=result.batch_size)
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row["map"] = list(out.shape)
    if os.environ.get("DENSE_TILES_SAVE"):
        torch.save(out, os.environ["DENSE_TILES_SAVE"])
    return row


def run_config(model: str, size: int, mode: str, threads: int, save: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if save is not None:
        env["DENSE_TILES_SAVE"] = str(save)
    proc = subprocess.run([sys.executable, __file__, "--child", model, str(size), mode, str(threads)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model, "size": size, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def deviation(path: Path, reference: Path) -> float:
    import torch

    a, b = torch.load(path), torch.load(reference)
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def table(rows: list[dict]) -> str:
    lines = ["| model | image | run | tile (tiles) | seconds | time ratio | halo overhead | ratio / overhead "
             "(target <= 1.10) | peak RSS GiB | MPix/s | max dev / max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    one = {(r["model"], r["size"]): r for r in rows if r["mode"] == "one-pass" and "seconds" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']}² | {r['mode']} | failed: {' '.join(r['error'])} "
                         "| | | | | | | |")
            continue
        base = one.get((r["model"], r["size"]))
        mpix = r["size"] ** 2 / 1e6 / r["seconds"]
        if r["mode"] == "one-pass":
            lines.append(f"| {r['model']} | {r['size']}² | one pass | | {r['seconds']:.2f} | 1.00 | 1.00 | | "
                         f"{r['peak_rss_gib']:.2f} | {mpix:.2f} | |")
            continue
        ratio = r["seconds"] / base["seconds"] if base else None
        judged = ratio / r["overhead"] if ratio else None
        dev = r.get("deviation")
        lines.append(
            f"| {r['model']} | {r['size']}² | tiled {r['mode']} | {r['tile']} ({r['tiles']}, batch "
            f"{r['batch_size']}) | {r['seconds']:.2f} | {f'{ratio:.2f}' if ratio else 'n/a'} | "
            f"{r['overhead']:.2f} | {f'{judged:.2f}' + (' ok' if judged <= 1.10 else ' over') if judged else 'n/a'} "
            f"| {r['peak_rss_gib']:.2f} | {mpix:.2f} | {f'{dev:.1e}' if dev is not None else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--modes", nargs="+", help="only these runs (one-pass, 512, 1024, default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    parser.add_argument("--json", type=Path, help="append the rows to this JSON-lines file too")
    parser.add_argument("--from-json", type=Path, help="only render (and --write) the rows of a JSON-lines file")
    parser.add_argument("--note", default="", help="a sentence added under the table (with --from-json)")
    args = parser.parse_args()
    if args.from_json:
        import torch

        rows = [json.loads(line) for line in args.from_json.read_text().splitlines() if line.strip()]
        text = (f"## Tiled dense scanning against one pass (`benchmarks/dense_tiles.py`)\n\n"
                f"On {platform.machine()}, 2 threads, torch {torch.__version__}; each run is one fresh process "
                "(peak RSS = `ru_maxrss`, model weights and the uint8 image included); one timed run each, random "
                "weights, random uint8 image. Halo overhead: input pixels computed over image pixels. "
                + args.note + "\n\n" + table(rows))
        print(text)
        if args.write:
            sys.path.insert(0, str(HERE))
            from results import write_section

            write_section("dense-tiles", text)
        return
    if args.child:
        model, size, mode, threads = args.child
        print(json.dumps(child(model, int(size), mode, int(threads))))
        return
    import tempfile

    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for model in args.models:
                reference = None
                for mode in TILES.get(size, ["default"]):
                    if args.modes and mode not in args.modes:
                        continue
                    save = Path(tmp) / f"{model}-{size}-{mode}.pt" if size <= 2048 else None
                    row = run_config(model, size, mode, args.threads, save)
                    if save is not None and "error" not in row:
                        if mode == "one-pass":
                            reference = save
                        elif reference is not None:
                            row["deviation"] = deviation(save, reference)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    load_after = os.getloadavg()[0]
    import torch

    text = (f"## Tiled dense scanning against one pass (`benchmarks/dense_tiles.py`)\n\n"
            f"`python benchmarks/dense_tiles.py --sizes {' '.join(map(str, args.sizes))} --models "
            f"{' '.join(args.models)}` on {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
            f"load average {load_before:.1f} before, {load_after:.1f} after (other processes share the cores); "
            f"{time.perf_counter() - began:.0f} s in all. Each run is one fresh process (peak RSS = "
            "`ru_maxrss`, model weights and the uint8 image included); one timed run each, random weights, "
            "random uint8 image. Halo overhead: input pixels computed over image pixels.\n\n" + table(rows))
    print(text)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results import write_section

        write_section("dense-tiles", text)


if __name__ == "__main__":
    main()
