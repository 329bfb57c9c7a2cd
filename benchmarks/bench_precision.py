"""The update check: do low-precision training variants still make the updates float32 makes?

Naive bfloat16 training loses small updates: at learning rate 1e-5 an AdamW step moves a
weight of 0.05 by ~1e-5, below half a bfloat16 spacing there (~1.2e-4), so round-to-nearest
puts the weight straight back where it was. This script fine-tunes the embedded
SmolLM2-135M with the README's main job (examples/quickstart.yaml on examples/data/sums:
gmt, mask ratio 0.2, batch 4) at learning rate 1e-5 for 16 steps, with the same data, seed
and settings, once in float32 (the reference) and once per low-precision variant, and
compares each variant's weight change (delta = tuned - base, per tensor) with the float32
run's:

- cosine similarity of the deltas per tensor (float64): median, minimum, and the mean
  weighted by tensor size;
- lost share: of the entries the float32 run changed (delta_f32 != 0), the fraction whose
  delta is exactly 0 in the variant (the update rounded away, or never made);
- relative error ||delta_v - delta_f32|| / ||delta_f32|| over all parameters.

A row "f32 rounded to bf16" (no run) rounds the float32 run's base and tuned weights to
bfloat16 and compares that delta with the float32 one: what storing the result in bfloat16
alone costs, a floor for any variant that keeps bfloat16 weights.

Variants are extra `gmt-mlx finetune` arguments, `--variant NAME="ARGS"` (repeatable; given
at least once, it replaces the default list), so flags that do not exist yet cost no code
change. A variant that fails (an unknown flag, a crash) is reported as failed and the
others go on. The default `naive-bf16` passes `--weight-rounding nearest`; where that flag
does not exist yet it is rerun without it (`--train-dtype bfloat16` alone is then the naive
run, which is what it means) and the report says so.

    python benchmarks/bench_precision.py                     # float32 + the default variants
    python benchmarks/bench_precision.py --variant naive-bf16="--train-dtype bfloat16"
    python benchmarks/bench_precision.py --work /tmp/prec --reuse   # keep runs, skip finished ones

Writes benchmarks/results/precision.json (commit, settings, per variant the metrics, wall
time and run details) and prints a markdown table. Each run takes ~2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "precision.json"
REFERENCE = "float32"
REFERENCE_ARGS = ["--train-dtype", "float32"]
DEFAULT_VARIANTS = [
    ("naive-bf16", "--train-dtype bfloat16 --weight-rounding nearest"),
    ("sr-bf16", "--train-dtype bfloat16 --weight-rounding stochastic"),
    ("low-memory", "--low-memory"),
]
# The naive fallback: `--weight-rounding nearest` is what `--train-dtype bfloat16` does
# when the flag does not exist, so a run refused for that flag alone is rerun without it.
FALLBACK_FLAG = ("--weight-rounding", "nearest")
RUN_RECORD = "bench_precision_run.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


def common_args(opts) -> List[str]:
    """What every run shares: the quickstart recipe, the check's rate and length, no extras.

    No samples, no periodic or best checkpoints (validation still runs once, at the end: its
    loss is reported), and the final model saved in float32, so the saved weights are exactly
    the trained ones (a bfloat16 weight is exact in float32).
    """
    return [
        "-c",
        str(opts.config),
        "--model",
        opts.model,
        "--seed",
        str(opts.seed),
        "--learning-rate",
        repr(opts.learning_rate),
        "--iters",
        str(opts.iters),
        "--samples",
        "0",
        "--steps-per-eval",
        "0",
        "--no-save-best",
        "--steps-per-save",
        "0",
        "--dtype",
        "float32",
        "--overwrite",
    ] + shlex.split(opts.common_args)


def run_finetune(name: str, extra: List[str], opts, work: Path) -> dict:
    """One `gmt-mlx finetune` run in work/name; returns its record (status, wall time, log)."""
    out = work / name
    argv = [sys.executable, "-m", "gmt_mlx", "finetune"] + common_args(opts) + ["--out", str(out)] + extra
    record_path = out / RUN_RECORD
    if opts.reuse and record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("argv") == argv and old.get("status") == "ok" and (out / "model").is_dir():
            log(f"{name}: reusing the finished run in {out}")
            old["reused"] = True
            return old
    log(f"{name}: {shlex.join(argv[1:])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    text = proc.stdout
    record = {
        "name": name,
        "argv": argv,
        "command": shlex.join(["gmt-mlx"] + argv[3:]),
        "extra_args": extra,
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
    }
    if proc.returncode == 0 and (out / "model").is_dir():
        record["status"] = "ok"
        record.update(parse_log(text))
        record.update(read_metrics(out))
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        (out / "bench_precision.log").write_text(text)
        log(f"{name}: done in {wall:.0f} s")
    else:
        record["status"] = "failed"
        record["error"] = error_lines(text)
        log(f"{name}: FAILED (exit {proc.returncode}): {record['error']}")
    return record


def error_lines(text: str, keep: int = 3) -> str:
    """The lines that say why a run failed (click's 'Error: ...', a traceback's last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error") or "Error:" in line or "error:" in line]
    return " | ".join((errors or lines)[-keep:])


def unknown_option(record: dict) -> Optional[str]:
    match = re.search(r"No such option: (--[\w-]+)", record.get("error", ""))
    return match.group(1) if match else None


def parse_log(text: str) -> dict:
    """The base model folder and BLAS the run used, from its start-up lines."""
    found = {}
    for line in text.splitlines():
        if line.startswith("model ") and "base_path" not in found:
            match = re.search(r"\(([^()]+)\)\s*$", line)
            if match and Path(match.group(1)).is_dir():
                found["base_path"] = match.group(1)
        elif line.startswith("blas ") and "blas" not in found:
            found["blas"] = line.split(None, 1)[1].strip()
        elif line.startswith("params ") and "params" not in found:
            found["params"] = line.split(None, 1)[1].strip()
    return found


def read_metrics(out: Path) -> dict:
    """Final train/valid loss and peak memory from the run's metrics.jsonl; train_dtype from its config."""
    found: Dict[str, object] = {}
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "train":
                found["train_loss"] = rec.get("loss")
                if rec.get("peak_memory_gb") is not None:
                    found["peak_memory_gb"] = rec.get("peak_memory_gb")
            elif rec.get("type") in ("eval", "valid", "val") or "val_loss" in rec:
                loss = rec.get("val_loss", rec.get("loss"))
                if loss is not None:
                    found["val_loss"] = loss
                if rec.get("val_exact_match") is not None:
                    found["val_exact_match"] = rec["val_exact_match"]
    config = out / "config.yaml"
    if config.is_file():
        match = re.search(r"^train_dtype:\s*(\S+)", config.read_text(), re.M)
        if match:
            found["train_dtype"] = match.group(1)
    return found


# --------------------------------------------------------------------------
# Deltas
# --------------------------------------------------------------------------


def load_weights(folder: Path) -> dict:
    """Every tensor of a Hugging Face folder's safetensors, as float32 mx arrays."""
    import mlx.core as mx

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {folder}")
    weights = {}
    for file in files:
        for key, value in mx.load(str(file)).items():
            weights[key] = value.astype(mx.float32)
    return weights


def to_f64(array):
    import mlx.core as mx
    import numpy as np

    mx.eval(array)
    return np.asarray(array, dtype=np.float32).astype(np.float64).ravel()


def rounded(array, dtype_name: str):
    """array (float32) rounded to dtype and back: what `model.set_dtype` makes of it."""
    import mlx.core as mx

    return array.astype(getattr(mx, dtype_name)).astype(mx.float32)


def held_dtype(tuned) -> str:
    """The dtype this tensor was held in at the end of training, read off its final values.

    A tensor held in bfloat16 (or float16) and saved in float32 holds only values of that
    dtype; one held in float32 does not (its float32 updates leave the bfloat16 grid almost
    everywhere). This is what tells whether a "bfloat16" run really kept bfloat16 weights.
    """
    import mlx.core as mx

    for name in ("bfloat16", "float16"):
        if mx.array_equal(rounded(tuned, name), tuned).item():
            return name
    return "float32"


def start_dtype(config_dtype: Optional[str], final_dtype: str) -> str:
    """The dtype of the weights the run started from.

    `--train-dtype bfloat16|float16` casts every weight before the first step, so that
    run started from the base rounded to it, whatever its weights ended in. Otherwise
    (float32, or a variant whose config does not say) a tensor that ended in bfloat16
    started there too (its first cast rounded the base); one that ended in float32 started
    from the float32 base.
    """
    return config_dtype if config_dtype in ("bfloat16", "float16") else final_dtype


class DeltaStats:
    """Accumulates the comparison of one variant's deltas with the float32 run's."""

    def __init__(self):
        self.tensors = []
        self.changed_ref = 0  # entries the float32 run changed
        self.lost = 0  # ... whose variant delta is exactly 0
        self.changed_var = 0  # entries the variant changed
        self.entries = 0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.var_sq = 0.0
        self.base_dtypes: Dict[str, int] = {}
        self.final_dtypes: Dict[str, int] = {}

    def add(self, name: str, d_ref, d_var, base_dtype: str, final_dtype: str) -> None:
        import numpy as np

        ref_nz = d_ref != 0
        var_zero = d_var == 0
        changed_ref = int(ref_nz.sum())
        lost = int((ref_nz & var_zero).sum())
        n_ref = float(np.dot(d_ref, d_ref))
        n_var = float(np.dot(d_var, d_var))
        dot = float(np.dot(d_ref, d_var))
        diff = d_var - d_ref
        self.diff_sq += float(np.dot(diff, diff))
        self.ref_sq += n_ref
        self.var_sq += n_var
        self.changed_ref += changed_ref
        self.lost += lost
        self.changed_var += int((~var_zero).sum())
        self.entries += d_ref.size
        self.base_dtypes[base_dtype] = self.base_dtypes.get(base_dtype, 0) + 1
        self.final_dtypes[final_dtype] = self.final_dtypes.get(final_dtype, 0) + 1
        if n_ref == 0:
            cosine = None  # the float32 run left it alone: no direction to compare with
        elif n_var == 0:
            cosine = 0.0
        else:
            cosine = dot / math.sqrt(n_ref * n_var)
        self.tensors.append(
            {
                "name": name,
                "size": int(d_ref.size),
                "cosine": cosine,
                "lost_share": lost / changed_ref if changed_ref else None,
                "rel_error": math.sqrt(float(np.dot(diff, diff)) / n_ref) if n_ref else None,
                "norm_ratio": math.sqrt(n_var / n_ref) if n_ref else None,
                "base": base_dtype,
                "held": final_dtype,
            }
        )

    def summary(self) -> dict:
        import numpy as np

        scored = [t for t in self.tensors if t["cosine"] is not None]
        cos = np.array([t["cosine"] for t in scored])
        sizes = np.array([t["size"] for t in scored], dtype=np.float64)
        worst = min(scored, key=lambda t: t["cosine"]) if scored else None
        return {
            "cosine_median": float(np.median(cos)) if scored else None,
            "cosine_min": float(cos.min()) if scored else None,
            "cosine_min_tensor": worst["name"] if worst else None,
            "cosine_weighted_mean": float((cos * sizes).sum() / sizes.sum()) if scored else None,
            "tensors_compared": len(scored),
            "lost_share": self.lost / self.changed_ref if self.changed_ref else None,
            "lost_entries": self.lost,
            "ref_changed_entries": self.changed_ref,
            "changed_share": self.changed_var / self.entries if self.entries else None,
            "rel_error": math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq else None,
            "norm_ratio": math.sqrt(self.var_sq / self.ref_sq) if self.ref_sq else None,
            "base_dtype_tensors": self.base_dtypes,
            "final_dtype_tensors": self.final_dtypes,
        }


def compare(base_path: Path, ref_dir: Path, variants: Dict[str, dict]) -> Dict[str, dict]:
    """Per-tensor comparison of each variant's delta with the float32 run's.

    The bases differ on purpose. The float32 run's delta is tuned - base with the float32
    base it loaded. A bfloat16 run casts the loaded weights to bfloat16 before its first
    step (`model.set_dtype`), so it started from the base rounded to bfloat16: its delta is
    taken against that rounded base (the float32 base cast to bfloat16 and back), otherwise
    the rounding of the start point would count as an update. That follows the run's
    train_dtype (`start_dtype`), not the dtype its weights end in, which can differ (a
    bfloat16 weight updated with a float32 step becomes float32); a variant whose config
    says float32 but whose tensors end in bfloat16 is taken to have rounded them at the start.
    """
    import mlx.core as mx

    log(f"comparing deltas (base {base_path})")
    base = load_weights(base_path)
    ref = load_weights(ref_dir / "model")
    tuned = {name: load_weights(Path(info["out"]) / "model") for name, info in variants.items()}
    stats = {name: DeltaStats() for name in variants}
    floor = DeltaStats()  # the float32 run's result, stored in bfloat16
    ref_changed = 0
    ref_entries = 0
    missing: Dict[str, List[str]] = {name: [] for name in variants}
    for key in sorted(base):
        b32 = base[key]
        if key not in ref:
            continue
        d_ref = to_f64(ref[key]) - to_f64(b32)
        ref_changed += int((d_ref != 0).sum())
        ref_entries += d_ref.size
        b16 = rounded(b32, "bfloat16")
        floor.add(key, d_ref, to_f64(rounded(ref[key], "bfloat16")) - to_f64(b16), "bfloat16", "bfloat16")
        for name, weights in tuned.items():
            if key not in weights or weights[key].shape != b32.shape:
                missing[name].append(key)
                continue
            held = held_dtype(weights[key])
            dtype = start_dtype(variants[name].get("train_dtype"), held)
            start = b32 if dtype == "float32" else rounded(b32, dtype)
            stats[name].add(key, d_ref, to_f64(weights[key]) - to_f64(start), dtype, held)
        if hasattr(mx, "clear_cache"):
            mx.clear_cache()
    results = {
        "__reference__": {
            "changed_share": ref_changed / ref_entries,
            "changed_entries": ref_changed,
            "entries": ref_entries,
        },
        "__floor__": floor.summary(),
    }
    for name in variants:
        results[name] = stats[name].summary()
        results[name]["tensors"] = stats[name].tensors
        if missing[name]:
            results[name]["missing_tensors"] = missing[name]
    return results


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "gmt_mlx"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"
    return commit + ("+uncommitted" if dirty else "")


def dtypes(counts: dict) -> str:
    return ", ".join(f"{dtype} ({n} tensors)" for dtype, n in sorted(counts.items()))


def fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"## Update check: {s['model']}, lr {s['learning_rate']:g}, {s['iters']} steps, seed {s['seed']} "
        f"({s['config']})",
        "",
        "Deltas (tuned - base, per tensor) against the float32 run's. cos: cosine per tensor "
        "(median / min / size-weighted mean); lost: share of the entries the float32 run changed "
        "whose delta is exactly 0 here; rel err: ||d - d_f32|| / ||d_f32||; changed: share of all "
        "entries that moved.",
        "",
        "| variant | status | cos median | cos min | cos weighted | lost | rel err | changed | val loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = report["reference"]
    lines.append(
        f"| float32 (reference) | {ref['status']} | 1 | 1 | 1 | 0 | 0 | "
        f"{fmt(ref.get('changed_share'), '.2%')} | {fmt(ref.get('val_loss'))} | {fmt(ref.get('wall_s'), '.0f')} |"
    )
    floor = report.get("floor")
    if floor:
        lines.append(
            f"| f32 rounded to bf16 (no run) | floor | {fmt(floor['cosine_median'])} | {fmt(floor['cosine_min'])} | "
            f"{fmt(floor['cosine_weighted_mean'])} | {fmt(floor['lost_share'], '.2%')} | {fmt(floor['rel_error'])} | "
            f"{fmt(floor['changed_share'], '.2%')} | - | - |"
        )
    notes = []
    if floor and floor.get("cosine_min_tensor"):
        notes.append(
            f"- f32 rounded to bf16: the float32 run's base and tuned weights both rounded to bfloat16 "
            f"(what bfloat16 storage of its result keeps); lowest cosine in {floor['cosine_min_tensor']}"
        )
    for name, v in report["variants"].items():
        if v["status"] != "ok":
            lines.append(f"| {name} | failed | - | - | - | - | - | - | - | {fmt(v.get('wall_s'), '.0f')} |")
            notes.append(f"- {name} failed: {v.get('error', '?')}")
            continue
        lines.append(
            f"| {name} | ok | {fmt(v['cosine_median'])} | {fmt(v['cosine_min'])} | {fmt(v['cosine_weighted_mean'])} | "
            f"{fmt(v['lost_share'], '.2%')} | {fmt(v['rel_error'])} | {fmt(v['changed_share'], '.2%')} | "
            f"{fmt(v.get('val_loss'))} | {fmt(v.get('wall_s'), '.0f')} |"
        )
        if v.get("cosine_min_tensor"):
            notes.append(
                f"- {name}: lowest cosine in {v['cosine_min_tensor']}; delta taken from the base in "
                f"{dtypes(v['base_dtype_tensors'])}; weights held at the end in {dtypes(v['final_dtype_tensors'])}"
            )
            if v.get("train_dtype") in ("bfloat16", "float16") and v["final_dtype_tensors"].get("float32"):
                notes.append(
                    f"- {name}: WARNING: trained with --train-dtype {v['train_dtype']}, yet "
                    f"{v['final_dtype_tensors']['float32']} tensors ended in float32 (their values are off the "
                    f"{v['train_dtype']} grid): the weights were promoted during training, so this run does not "
                    "measure low-precision weight updates"
                )
        if v.get("note"):
            notes.append(f"- {name}: {v['note']}")
    lines += [
        "",
        "Variant arguments (after the common ones): "
        + "; ".join(f"{n}: `{' '.join(v['extra_args'])}`" for n, v in report["variants"].items()),
    ]
    lines += [""] + notes if notes else []
    lines += ["", f"commit {report['commit']}"]
    return "\n".join(lines)


def parse_variant(text: str):
    name, sep, args = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name == REFERENCE:
        raise argparse.ArgumentTypeError(
            f'expected NAME="ARGS" (NAME of letters, digits, _.+-, not {REFERENCE!r}): {text!r}'
        )
    return name, args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        metavar='NAME="ARGS"',
        help="a low-precision variant: extra gmt-mlx finetune arguments (repeatable; replaces the "
        "default list: " + "; ".join(f"{n}={a}" for n, a in DEFAULT_VARIANTS) + ")",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config", default="examples/quickstart.yaml", help="the recipe (relative to the repo root)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--common-args", default="", help="more finetune arguments for every run, the reference included"
    )
    parser.add_argument(
        "--work", type=Path, help="where the runs go (kept); default: a temporary folder, removed at the end"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip a run whose folder in --work holds a finished run of the same command",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    opts = parser.parse_args(argv)
    if opts.reuse and opts.work is None:
        parser.error("--reuse needs --work")
    variants = opts.variant or DEFAULT_VARIANTS
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        parser.error(f"variant names repeat: {names}")

    work = opts.work or Path(tempfile.mkdtemp(prefix="gmt-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ref = run_finetune(REFERENCE, REFERENCE_ARGS, opts, work)
        ref["out"] = str(work / REFERENCE)
        runs: Dict[str, dict] = {}
        for name, args in variants:
            extra = shlex.split(args)
            record = run_finetune(name, extra, opts, work)
            flag, value = FALLBACK_FLAG
            if record["status"] == "failed" and unknown_option(record) == flag and value in extra:
                i = next(i for i in range(len(extra) - 1) if extra[i] == flag and extra[i + 1] == value)
                fallback = extra[:i] + extra[i + 2 :]
                log(
                    f"{name}: {flag} is unknown here; rerunning without it ({' '.join(fallback)}: round-to-nearest is "
                    "what bfloat16 training does without the flag)"
                )
                record = run_finetune(name, fallback, opts, work)
                record["note"] = (
                    f"{flag} is not a finetune option at this commit; ran `{' '.join(fallback)}` "
                    f"instead (what `{flag} {value}` is meant to be: round-to-nearest)"
                )
            record["out"] = str(work / name)
            runs[name] = record

        report = {
            "benchmark": "precision (update check)",
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join([Path(sys.executable).name] + sys.argv),
            "settings": {
                "model": opts.model,
                "config": opts.config,
                "learning_rate": opts.learning_rate,
                "iters": opts.iters,
                "seed": opts.seed,
                "common_args": common_args(opts),
                "reference_args": REFERENCE_ARGS,
            },
            "environment": {
                "python": platform.python_version(),
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "blas": ref.get("blas"),
            },
            "reference": {k: v for k, v in ref.items() if k not in ("argv",)},
            "variants": {},
        }
        try:
            import mlx.core as mx

            report["environment"]["mlx"] = mx.__version__
        except ImportError:
            pass
        ok = {n: r for n, r in runs.items() if r["status"] == "ok"}
        if ref["status"] == "ok":
            base_path = Path(ref.get("base_path") or resolve_base(opts.model))
            report["settings"]["base_path"] = str(base_path)
            results = compare(base_path, work / REFERENCE, ok)
            report["reference"].update(results["__reference__"])
            report["floor"] = results["__floor__"]
        else:
            results = {}
            log("the float32 reference failed: nothing to compare with")
        for name, record in runs.items():
            entry = {k: v for k, v in record.items() if k not in ("argv",)}
            if name in results:
                entry.update(results[name])
            report["variants"][name] = entry
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = opts.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(opts.json)
        print(render(report))
        log(f"wrote {opts.json}")
        return 0 if ref["status"] == "ok" else 1
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)


def resolve_base(model: str) -> Path:
    """The folder a run of `model` loads (when its log did not name it)."""
    sys.path.insert(0, str(REPO))
    from gmt_mlx.models.resolve import resolve_model

    return resolve_model(model)


if __name__ == "__main__":
    sys.exit(main())
