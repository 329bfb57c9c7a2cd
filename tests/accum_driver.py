"""One rank's share of tests/unit/core/test_accumulation.py, under `mlx.launch -n N --backend ring`.

Usage: mlx.launch -n N --backend ring -- python tests/accum_driver.py MODEL_DIR OUT_DIR METHOD...
Each rank trains on its contiguous 1/N slice of every global batch (as
finetune shards them) and rank 0 writes OUT_DIR/METHOD/weights.safetensors
and OUT_DIR/METHOD/masks-STEP.safetensors. (One launch for every method:
starting the ranks is the slow part.)
"""

import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.unit.core.test_accumulation import STEPS, global_batches, train_recording  # noqa: E402


def main() -> None:
    model_dir, out, methods = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    group = mx.distributed.init()
    n, rank = group.size(), group.rank()

    def shard():
        for tokens, mask in global_batches():
            size = tokens.shape[0] // n
            yield tokens[rank * size : (rank + 1) * size], mask[rank * size : (rank + 1) * size]

    for method in methods:
        weights, masks = train_recording(model_dir, method, shard(), accumulation=1, group=group)
        if rank == 0:
            (out / method).mkdir(parents=True, exist_ok=True)
            mx.save_safetensors(str(out / method / "weights.safetensors"), weights)
            for step in range(STEPS):
                if masks[step]:
                    mx.save_safetensors(str(out / method / f"masks-{step}.safetensors"), masks[step])


if __name__ == "__main__":
    main()
