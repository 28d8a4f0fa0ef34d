"""What does rewriting a large ONNX file cost beyond reading and writing it (issue 22, item 6)?

The file: torchvision vgg16 (random weights, eval) exported once with the
legacy exporter at 224x224, about 550 MB, kept in a cache folder outside the
repository (``~/.cache/convify/benchmarks/vgg16.onnx``) so that reruns do
not export again. Three ways from that file to a rewritten one, each run in
a fresh process of its own, interleaved (floor, library, CLI, floor, ...)
``--repeats`` times, outputs deleted between runs, all in the same folder:

- the floor: ``onnx.load`` then ``onnx.save`` (no rewrite can do less);
- the library: ``read_model`` -> ``rewrite_onnx(model, [MaxPoolOptions("exact"),
  HeadOptions("conv")])`` -> ``write_model``;
- the CLI: ``python -m convify rewrite vgg16.onnx --pool exact -o out.onnx``
  (the ``convify`` script's code; head conv by default), wall time of the
  whole process, interpreter start and imports included.

Floor and library are timed inside their process, imports left out. Peak
memory is each process's own ``ru_maxrss`` (``os.wait4``: RUSAGE_CHILDREN
would be the largest over all children so far), nothing subtracted; Linux
carries the parent's high-water mark into a forked child, so the parent
loads no model itself (the check below runs in a child too). The
baselines of processes that only import (python + onnx; + convify's ONNX
frontend; the CLI's imports) show what imports alone hold. Once, outside the
timed runs, the output is checked: it loads, passes
``onnx.checker.check_model(path, full_check=True)``, holds no MaxPool and no
Gemm, the CLI wrote the same bytes as the library, and onnxruntime (CPU, one
thread) gives the original's logits on one random input within 1e-4
relative. ``--profile`` adds the library path's steps (read, each rewrite,
write) under cProfile and where its peak memory is reached.

Targets: the library at most 2x the floor's time, peak memory at most 2x the
file's size.

    python benchmarks/onnx_rewrite_speed.py [--repeats 3] [--profile] [--write]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "convify" / "benchmarks"
MODEL = CACHE / "vgg16.onnx"
OUT = CACHE / "out"
ROOT = Path(__file__).resolve().parent.parent
TIME_TARGET, MEMORY_TARGET = 2.0, 2.0


# --------------------------------------------------------------------------- what runs in a child process


def _floor(src: str, out: str) -> None:
    import onnx  # noqa: PLC0415

    start = time.perf_counter()
    onnx.save(onnx.load(src), out)
    print(time.perf_counter() - start)


def _library(src: str, out: str) -> None:
    from convify.core.rewrites.head import HeadOptions  # noqa: PLC0415
    from convify.core.rewrites.maxpool import MaxPoolOptions  # noqa: PLC0415
    from convify.onnx import read_model, rewrite_onnx, write_model  # noqa: PLC0415

    start = time.perf_counter()
    model = rewrite_onnx(read_model(src), [MaxPoolOptions(mode="exact"), HeadOptions(mode="conv")])
    write_model(model, out)
    print(time.perf_counter() - start)


def _imports(what: str) -> None:
    import onnx  # noqa: F401, PLC0415

    if what == "import-convify":
        from convify.core.rewrites.head import HeadOptions  # noqa: F401, PLC0415
        from convify.core.rewrites.maxpool import MaxPoolOptions  # noqa: F401, PLC0415
        from convify.onnx import read_model, rewrite_onnx, write_model  # noqa: F401, PLC0415
    print(0.0)


def _profile(src: str, out: str) -> None:
    """Each step of the library path: seconds, peak RSS after it, and cProfile's top functions."""
    import cProfile  # noqa: PLC0415
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from convify.core.rewrites.head import HeadOptions  # noqa: PLC0415
    from convify.core.rewrites.maxpool import MaxPoolOptions  # noqa: PLC0415
    from convify.onnx import read_model, rewrite_onnx, write_model  # noqa: PLC0415

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    print(f"| imports | - | {peak():.0f} | {now():.0f} |")
    def write(m):
        write_model(m, out)
        return m

    profiler = cProfile.Profile()
    model = None
    steps = (("read_model", lambda _: read_model(src)),
             ("rewrite_onnx: pool exact (its shape inference included)",
              lambda m: rewrite_onnx(m, MaxPoolOptions(mode="exact"))),
             ("rewrite_onnx: head conv (its shape inference included)",
              lambda m: rewrite_onnx(m, HeadOptions(mode="conv"))),
             ("write_model", write))
    for name, step in steps:
        start = time.perf_counter()
        profiler.enable()
        model = step(model)
        profiler.disable()
        print(f"| {name} | {time.perf_counter() - start:.2f} | {peak():.0f} | {now():.0f} |")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(10)
    print("PROFILE")
    print(text.getvalue())


def child(what: str, src: str, out: str) -> None:
    if what == "floor":
        _floor(src, out)
    elif what == "library":
        _library(src, out)
    elif what == "check":
        print("\n".join(check(Path(src), Path(out))))
    elif what == "profile":
        _profile(src, out)
    else:
        _imports(what)


# --------------------------------------------------------------------------- the parent


def run(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` to its end: (wall seconds, its own peak RSS in MiB, its stdout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, env=env, cwd=ROOT, text=True)
        stdout = proc.stdout.read()  # to its end; then wait4 reaps the process itself (Popen.wait would first)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed:\n{errors.read()[-3000:]}")
    return wall, usage.ru_maxrss / 1024, stdout


def in_child(what: str, out: Path | None = None) -> list[str]:
    return [sys.executable, __file__, "--child", what, str(MODEL), str(out or OUT / "unused.onnx")]


def cli_argv(out: Path) -> list[str]:
    return [sys.executable, "-m", "convify", "rewrite", str(MODEL), "--pool", "exact", "-o", str(out)]


def export_once() -> None:
    """vgg16 as ONNX into the cache (once: a rerun finds it there)."""
    if MODEL.exists():
        return
    import torch  # noqa: PLC0415
    import torchvision  # noqa: PLC0415

    CACHE.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.vgg16(weights=None).eval()
    tmp = MODEL.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(tmp), dynamo=False, input_names=["input"],
                      output_names=["logits"])
    os.replace(tmp, MODEL)


def clear() -> None:
    for path in OUT.glob("*"):
        path.unlink()


def check(library_out: Path, cli_out: Path) -> list[str]:
    """What the brief asks of the output, checked once; each line a finding."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    onnx.checker.check_model(str(library_out), full_check=True)
    ops = {n.op_type for n in onnx.load(str(library_out), load_external_data=False).graph.node}
    left = sorted(ops & {"MaxPool", "Gemm"})
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    outs = []
    for path in (MODEL, library_out):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    rel = float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max())
    same = library_out.read_bytes() == cli_out.read_bytes()
    return [f"`onnx.checker.check_model(path, full_check=True)` passes on the rewritten file",
            f"ops left of MaxPool/Gemm: {left or 'none'} (ops now: {', '.join(sorted(ops))})",
            f"onnxruntime CPU, 1 thread, one random input: max |logit difference| / max |logit| = {rel:.1e} "
            f"({'within' if rel <= 1e-4 else 'NOT within'} 1e-4)",
            f"the CLI's output is {'byte for byte' if same else 'NOT'} the library's"]


def verdict(value: float, target: float) -> str:
    return f"**{'met' if value <= target else 'missed'}**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile the library path's steps")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    parser.add_argument("--sharing", default="", help="what else ran on the machine meanwhile, for RESULTS.md")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    load_before = os.getloadavg()
    export_once()
    OUT.mkdir(parents=True, exist_ok=True)
    clear()
    size = MODEL.stat().st_size / 2**20

    library_out, cli_out = OUT / "library.onnx", OUT / "cli.onnx"
    run(in_child("library", library_out))  # warm-up (file cache, .pyc) and the outputs to check
    run(cli_argv(cli_out))
    findings = run([sys.executable, __file__, "--child", "check", str(library_out), str(cli_out)])[2].splitlines()
    clear()
    for line in findings:
        print("-", line, flush=True)

    imports = {what: run(in_child(what)) for what in ("import-onnx", "import-convify")}
    times: dict[str, list[float]] = {"floor": [], "library": [], "cli": []}
    peaks: dict[str, list[float]] = {"floor": [], "library": [], "cli": []}
    for i in range(args.repeats):  # interleaved, so that the other jobs' load hits all three alike
        for name in times:
            out = OUT / f"{name}.onnx"
            if name == "cli":
                wall, peak, _ = run(cli_argv(out))
                seconds = wall
            else:
                _, peak, stdout = run(in_child(name, out))
                seconds = float(stdout.split()[-1])
            times[name].append(seconds)
            peaks[name].append(peak)
            clear()
            print(f"round {i + 1}: {name} {seconds:.2f} s, peak {peak:.0f} MiB", flush=True)

    floor = statistics.median(times["floor"])
    what = {"floor": "`onnx.load` + `onnx.save` (in process)",
            "library": "`read_model` -> `rewrite_onnx` -> `write_model` (in process)",
            "cli": "`python -m convify rewrite ... --pool exact -o` (whole process)"}
    rows = ["| path | median s (runs) | x floor | peak RSS MiB (max of runs) | x file size |", "|---|---|---|---|---|"]
    for name in times:
        t, p = statistics.median(times[name]), max(peaks[name])
        runs = ", ".join(f"{s:.2f}" for s in times[name])
        rows.append(f"| {what[name]} | {t:.2f} ({runs}) | {t / floor:.2f}x | {p:.0f} | {p / size:.2f}x |")
    import_rows = ["| process that only imports | wall s | peak RSS MiB |", "|---|---|---|"]
    labels = {"import-onnx": "python + onnx", "import-convify": "python + onnx + convify.onnx (what the library "
                                                                "path imports)"}
    for key, (wall, peak, _) in imports.items():
        import_rows.append(f"| {labels[key]} | {wall:.2f} | {peak:.0f} |")
    library_t, library_p = statistics.median(times["library"]), max(peaks["library"])
    cli_t, cli_p = statistics.median(times["cli"]), max(peaks["cli"])
    verdicts = [f"- time, library: {library_t / floor:.2f}x the floor: {verdict(library_t / floor, TIME_TARGET)} "
                f"(target {TIME_TARGET:g}x); the CLI, start and imports included: {cli_t / floor:.2f}x",
                f"- peak memory, library: {library_p / size:.2f}x the file: {verdict(library_p / size, MEMORY_TARGET)} "
                f"(target {MEMORY_TARGET:g}x); the CLI: {cli_p / size:.2f}x; the floor itself: "
                f"{max(peaks['floor']) / size:.2f}x"]
    profile = ""
    if args.profile:
        _, _, stdout = run(in_child("profile", OUT / "profile.onnx"))
        clear()
        steps, _, stats = stdout.partition("PROFILE")
        profile = ("\n\nThe library path, step by step in one process under cProfile (peak: `ru_maxrss` after the "
                   "step; now: RSS after it):\n\n| step | s | peak MiB | now MiB |\n|---|---|---|---|\n"
                   + steps.strip() + "\n\n```\n" + _top(stats) + "\n```")
    load_after = os.getloadavg()
    table = "\n".join(rows)
    print(table, "\n".join(import_rows), "\n".join(verdicts), profile, sep="\n\n")
    if args.write:
        from results import write_section  # noqa: PLC0415  (benchmarks/results.py, beside this script)

        import onnx  # noqa: PLC0415

        loads = lambda la: ", ".join(f"{v:.2f}" for v in la)  # noqa: E731
        write_section("onnx-rewrite-speed", "\n".join([
            "## Rewriting a large ONNX file against load + save (`benchmarks/onnx_rewrite_speed.py`)", "",
            f"`python benchmarks/onnx_rewrite_speed.py --repeats {args.repeats}{' --profile' if args.profile else ''}"
            f" --write` on {platform.machine()}, {os.cpu_count()} cores"
            f"{f' shared with {args.sharing} running meanwhile' if args.sharing else ''} (load averages "
            f"1/5/15 min: {loads(load_before)} before, {loads(load_after)} after), "
            f"Python {platform.python_version()}, onnx {onnx.__version__}. The file: torchvision vgg16, random "
            f"weights, legacy exporter, 224x224, {size:.0f} MiB. Each run is a fresh process; {args.repeats} "
            "interleaved rounds; median seconds; peak RSS is the process's own `ru_maxrss`, nothing subtracted. "
            "Targets: the library at most 2x the floor's time, peak memory at most 2x the file's size.", "",
            table, "", "\n".join(import_rows), "", *verdicts, "", "Output checked once, outside the timed runs:", "",
            *[f"- {line}" for line in findings]]) + profile)


def _top(stats: str) -> str:
    lines = [line for line in stats.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:start + 11])


if __name__ == "__main__":
    main()
