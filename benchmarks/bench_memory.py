"""Peak memory (RSS) of ONE training step: gmt-mlx contenders next to `mlx_lm lora --fine-tune-type full`.

    python benchmarks/bench_memory.py --shape tiny
    python benchmarks/bench_memory.py --shape 135m --contender "full-f32=--method full"
    python benchmarks/bench_memory.py --shape 1.4b --contender "gmt-low=--method gmt --low-memory"
    python benchmarks/bench_memory.py --shape 1.4b --only-mlx-lm

Every contender is its own process under ``/usr/bin/time -v`` ("Maximum
resident set size"), one after another (never in parallel: they compete for
memory), on the same random-weight model (``make_shape.py``, bfloat16 weights)
and the same one-batch data set (batch 1, ~49 tokens). The result is the
peak RSS per contender, bytes per parameter and the ratio to mlx_lm's full
fine-tuning, written to ``benchmarks/results/memory-<shape>.json`` and printed
as a markdown table.

What the peak covers. Both tools load the model, run one validation batch,
one optimizer step and a final save; RSS is the whole process. So next to it
each row shows MLX's own peak during training (``mx.get_peak_memory()``):
gmt-mlx's from its metrics.jsonl (written right after the step, before the
end-of-run validation and the model export), mlx_lm's printed by a thin
wrapper just before its final save (mlx_lm validates one batch BEFORE step 1,
then steps, then saves). RSS far above that peak means the peak is elsewhere
(loading, the final save). Wall time includes loading and saving.

Like for like: mlx_lm's full fine-tuning trains the blocks only (embeddings,
tied head and final norm frozen: 5% of the 1.4b shape); gmt-mlx trains them
too unless a contender adds ``--freeze-embeddings --freeze-lm-head``.

Careful at 1.4b: the float32 contenders need ~29 GB, more than these 24 GB
machines have; pass ``--contender`` for the low-memory ones or ``--only-mlx-lm``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import make_shape  # noqa: E402

DEFAULT_CONTENDERS = [
    "full-f32=--method full",
    "gmt-f32=--method gmt",
    "full-low=--method full --low-memory",
    "gmt-low=--method gmt --low-memory",
    "lora=--method lora",
]
# One step of batch 1; no step-0/periodic validation, checkpoints or sample answers.
# --steps-per-eval 0 still validates once at the end, hence --val-batches 1.
GMT_COMMON = [
    "--overwrite",
    "--iters",
    "1",
    "--batch-size",
    "1",
    "--no-memory-check",
    "--steps-per-eval",
    "0",
    "--val-batches",
    "1",
    "--samples",
    "0",
    "--no-save-best",
    "--steps-per-save",
    "0",
    "--steps-per-report",
    "1",
]
# mlx_lm always validates at iteration 1 (before the step, val_batches batches of the valid split),
# whatever --steps-per-eval says; --val-batches 1 keeps that to one forward pass of one example.
MLX_LM_ARGS = [
    "--train",
    "--fine-tune-type",
    "full",
    "--num-layers",
    "-1",
    "--iters",
    "1",
    "--batch-size",
    "1",
    "--steps-per-eval",
    "1000",
    "--val-batches",
    "1",
    "--steps-per-report",
    "1",
    "--save-every",
    "1000",
]
# `python -m mlx_lm lora ...`, plus MLX's peak printed just before mlx_lm's final save.
MLX_LM_WRAPPER = r"""
import sys
import mlx.core as mx
_save = mx.save_safetensors
def _save_after_peak(*a, **k):
    print(f"BENCH_MLX_PEAK {mx.get_peak_memory()}", file=sys.stderr, flush=True)
    return _save(*a, **k)
mx.save_safetensors = _save_after_peak  # mlx_lm's trainer calls mx.save_safetensors at the end
sys.argv = ["mlx_lm"] + sys.argv[1:]
from mlx_lm import cli
cli.main()
from gmt_mlx.platform.blas import blas_info  # after the run: which BLAS MLX was bound to
print(f"BENCH_BLAS {blas_info(measure=False)['library']}", file=sys.stderr, flush=True)
"""
TOKEN_COUNT = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = [json.loads(l) for l in open(sys.argv[2])]
chats = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in rows]
print(json.dumps([len(tok.apply_chat_template(chat, tokenize=True, return_dict=False)) for chat in chats]))
"""


def write_data(folder: Path, rows: int = 4) -> Path:
    """train/valid.jsonl in the completions format; with SmolLM2's chat template each row is ~49 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"prompt": f"What is {10 + i} plus {20 + i}?", "completion": f"The sum is {30 + 2 * i}."})
        for i in range(rows)
    ]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def param_count(folder: Path) -> int:
    """Parameters stored in a model folder, from its safetensors headers (nothing loaded)."""
    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                size = 1
                for d in meta["shape"]:
                    size *= d
                n += size
    return n


def blas_env() -> tuple[dict, str | None]:
    """The environment that gives a child process the optimized BLAS the gmt-mlx CLI picks.

    gmt-mlx re-execs itself with it (and checks it numerically); mlx_lm does not, so its process
    gets the same LD_PRELOAD from gmt_mlx.platform.blas here. GMT_MLX_BLAS=reference keeps both on MLX's
    reference BLAS."""
    from gmt_mlx.platform import blas

    if (os.environ.get(blas.ENV_VAR) or "").strip().lower() in blas.OPT_OUT_VALUES:
        return dict(os.environ), None
    lib = blas.find_optimized_blas()
    env = blas.preload_environment(lib) if lib else None
    return (env, str(lib)) if env else (dict(os.environ), None)


def run_measured(cmd: list[str], env: dict, log_dir: Path, name: str, timeout: float) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; its peak RSS, exit code, wall time and stderr tail."""
    tfile, out, err = (log_dir / f"{name}.{x}" for x in ("time", "stdout", "stderr"))
    t0 = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        # Own session: on timeout the whole group (time, the tool, its re-exec) is killed.
        p = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", str(tfile)] + cmd,
            env=env,
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
    wall = time.perf_counter() - t0
    timing = tfile.read_text() if tfile.is_file() else ""
    rss_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing)
    status = re.search(r"Exit status: (-?\d+)", timing)
    killed = re.search(r"Command terminated by signal (\d+)", timing)
    stderr_lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
    mlx_peak = [int(line.split()[1]) for line in stderr_lines if line.startswith("BENCH_MLX_PEAK ")]
    # The BLAS MLX used: gmt-mlx logs a "blas ..." line, the mlx_lm wrapper a BENCH_BLAS one.
    blas = re.search(
        r"^(?:BENCH_BLAS|\s*blas) +(.+)$",
        out.read_text(errors="replace") + "\n" + "\n".join(stderr_lines),
        re.MULTILINE,
    )
    exit_code = int(status.group(1)) if status else rc
    res = {
        "command": shlex.join(cmd),
        "exit_code": exit_code,
        "signal": int(killed.group(1)) if killed else None,
        "timed_out": wall >= timeout,
        # kbytes as GNU time reports them (KiB), in GB = 1e9 bytes like mx.get_peak_memory() / 1e9.
        "peak_rss_gb": int(rss_kb.group(1)) * 1024 / 1e9 if rss_kb else None,
        "wall_s": round(wall, 1),
        "mlx_peak_gb": mlx_peak[0] / 1e9 if mlx_peak else None,
        "blas": blas.group(1).strip() if blas else None,
    }
    ok = exit_code == 0 and not killed and not res["timed_out"]
    if not ok:
        tail = [line for line in stderr_lines if not line.startswith("BENCH_")]
        res["last_stderr"] = tail[-1][:400] if tail else ""
    res["ok"] = ok
    return res


def metrics_peak(run_dir: Path, key: str = "peak_memory_gb") -> float | None:
    """Largest ``key`` of gmt-mlx's train records: peak_memory_gb is mx.get_peak_memory() right after the
    step, memory_estimate_gb the start-up estimate (run/memory.py)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    peaks = [r.get(key) for r in map(json.loads, f.read_text().splitlines()) if r.get("type") == "train"]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def parse_contender(spec: str) -> tuple[str, list[str]]:
    name, sep, args = spec.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--contender {spec!r}: expected NAME=ARGS, e.g. 'gmt-low=--method gmt --low-memory'")
    return name.strip(), shlex.split(args)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlx", "mlx-lm", "gmt-mlx", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    mem = (
        re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if Path("/proc/meminfo").exists()
        else None
    )
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(int(mem.group(1)) * 1024 / 1e9, 1) if mem else None,
        "python": platform.python_version(),
    }


def commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except OSError:
        return None


def fmt(x, digits=2, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _vs(c: dict) -> str:
    estimate, peak = c.get("estimate_gb"), c.get("mlx_peak_gb")
    if estimate is None:
        return "-"
    return f"{estimate:.2f} ({(estimate / peak - 1) * 100:+.0f}%)" if peak else f"{estimate:.2f}"


def render(report: dict) -> str:
    lines = [
        f"Peak RSS of one training step (batch 1, {report['tokens_per_example']} tokens), "
        f"shape {report['shape']} ({report['params']:,} parameters, {report['weights_dtype']} weights), "
        f"BLAS {report['blas'] or 'reference'}, commit {report['commit']}",
        "",
        "| contender | peak RSS GB | bytes / param | vs mlx_lm | MLX peak in training GB | estimate GB "
        "(vs MLX peak) | wall s | exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["contenders"]:
        exit_ = "ok" if c["ok"] else f"{c['exit_code']}" + (f" (signal {c['signal']})" if c["signal"] else "")
        lines.append(
            f"| {c['name']} | {fmt(c['peak_rss_gb'])} | {fmt(c['bytes_per_param'], 1)} | "
            f"{fmt(c['ratio_to_mlx_lm'], 2, 'x')} | {fmt(c['mlx_peak_gb'])} | {_vs(c)} | {fmt(c['wall_s'], 0)} | "
            f"{exit_} |"
        )
    failed = [c for c in report["contenders"] if not c["ok"]]
    if failed:
        lines.append("")
        lines += [f"- {c['name']} failed (exit {c['exit_code']}): {c.get('last_stderr', '')}" for c in failed]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--shape",
        default="tiny",
        choices=sorted(make_shape.SHAPES) + ["135m"],
        help="random-weight qwen2 shape from make_shape.py, or 135m: the embedded smollm2-135m itself",
    )
    ap.add_argument(
        "--contender",
        action="append",
        metavar="NAME=ARGS",
        help="a gmt-mlx contender: its name and extra `gmt-mlx finetune` arguments (repeatable; default: "
        + "; ".join(DEFAULT_CONTENDERS)
        + ")",
    )
    ap.add_argument("--only-mlx-lm", action="store_true", help="measure mlx_lm only")
    ap.add_argument("--no-mlx-lm", action="store_true", help="skip mlx_lm (no ratios then)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per contender before it is killed")
    ap.add_argument(
        "--logs", type=Path, help="keep each contender's stdout/stderr/time output here (default: discarded)"
    )
    ap.add_argument("--out", type=Path, help="JSON report (default benchmarks/results/memory-<shape>.json)")
    args = ap.parse_args(argv)
    out = args.out or HERE / "results" / f"memory-{args.shape}.json"

    if args.shape == "135m":
        folder = make_shape.smollm2_folder()
        gmt_model, weights_dtype = "smollm2-135m", json.loads((folder / "config.json").read_text()).get("torch_dtype")
    else:
        folder = make_shape.build(args.shape)
        gmt_model, weights_dtype = str(folder), "bfloat16"
    params = param_count(folder)
    print(f"model {folder}: {params:,} parameters", file=sys.stderr)

    env, blas_lib = blas_env()
    env["PYTHONUNBUFFERED"] = "1"
    gmt_env = dict(os.environ)  # gmt-mlx finds, checks and preloads the BLAS itself
    specs = [] if args.only_mlx_lm else [parse_contender(s) for s in (args.contender or DEFAULT_CONTENDERS)]

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "data")
        tokens = json.loads(
            subprocess.run(
                [sys.executable, "-c", TOKEN_COUNT, str(folder), str(data / "train.jsonl")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        print(f"data: {len(tokens)} rows of {tokens} tokens (chat template included)", file=sys.stderr)
        logs = args.logs or tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        results = []
        if not args.no_mlx_lm:
            cmd = [
                sys.executable,
                "-c",
                MLX_LM_WRAPPER,
                "lora",
                "--model",
                str(folder),
                "--data",
                str(data),
                "--adapter-path",
                str(tmp / "mlx_lm"),
            ] + MLX_LM_ARGS
            print("running mlx_lm ...", file=sys.stderr, flush=True)
            r = run_measured(cmd, env, logs, "mlx_lm", args.timeout)
            r["command"] = r["command"].replace(shlex.quote(MLX_LM_WRAPPER), "MLX_LM_WRAPPER")  # = python -m mlx_lm
            results.append({"name": "mlx_lm", "tool": "mlx_lm", "extra_args": [], **r})
            shutil.rmtree(tmp / "mlx_lm", ignore_errors=True)
        for name, extra in specs:
            run_dir = tmp / f"run-{name}"
            cmd = (
                [
                    sys.executable,
                    "-m",
                    "gmt_mlx",
                    "finetune",
                    "--model",
                    gmt_model,
                    "--data",
                    str(data),
                    "--out",
                    str(run_dir),
                ]
                + GMT_COMMON
                + extra
            )
            print(f"running {name} ...", file=sys.stderr, flush=True)
            r = run_measured(cmd, gmt_env, logs, name, args.timeout)
            r["mlx_peak_gb"] = metrics_peak(run_dir)
            r["estimate_gb"] = metrics_peak(run_dir, "memory_estimate_gb")
            results.append({"name": name, "tool": "gmt-mlx", "extra_args": extra, **r})
            shutil.rmtree(run_dir, ignore_errors=True)  # a 1.4b run's exported model is GBs of disk

    ref = next((c for c in results if c["tool"] == "mlx_lm" and c["ok"]), None)
    for c in results:
        rss = c["peak_rss_gb"] if c["ok"] else None
        c["bytes_per_param"] = rss * 1e9 / params if rss else None
        c["ratio_to_mlx_lm"] = rss / ref["peak_rss_gb"] if rss and ref else None
    report = {
        "benchmark": "memory",
        "shape": args.shape,
        "model": str(folder),
        "params": params,
        "weights_dtype": weights_dtype,
        "tokens_per_example": tokens[0] if len(set(tokens)) == 1 else tokens,
        "batch_size": 1,
        "blas": blas_lib,
        "machine": machine(),
        "versions": versions(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv[1:],
        "gmt_common_args": GMT_COMMON,
        "mlx_lm_args": MLX_LM_ARGS,
        "contenders": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"\nwritten: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
