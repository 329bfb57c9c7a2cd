"""Run several finetune configs inside ONE `mlx.launch` job (launch start-up is the slow part).

Usage: mlx.launch -n N --backend ring -- python tests/dist_driver.py JOBS.json
JOBS.json: a list of {"config": {...Config fields...}, "rank_overrides": {"1": {...}}}.
Each rank writes OUT/rank-R.sha256 (a digest of its final weights) and any
one-line error to OUT/rank-R.error.
"""

import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gmt_mlx.config import Config
from gmt_mlx.errors import UserError
from gmt_mlx.recipes.finetune import finetune


def digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters())):
        h.update(name.encode())
        h.update(np.array(value.astype(mx.float32)).tobytes())
    return h.hexdigest()


def main() -> None:
    rank = mx.distributed.init().rank()
    for job in json.loads(Path(sys.argv[1]).read_text()):
        values = {**job["config"], **job.get("rank_overrides", {}).get(str(rank), {})}
        out = Path(job["config"]["out"])
        try:
            result = finetune(Config(**values), log=lambda *_: None)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank-{rank}.sha256").write_text(digest(result.model))
        except UserError as err:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank-{rank}.error").write_text(str(err))


if __name__ == "__main__":
    main()
