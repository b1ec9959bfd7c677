"""Write the image example's data: each site's own folder of PNG images, one sub-folder per class.

The images are generated (class-dependent shapes on random colours: nothing is
downloaded). The sites differ as hospitals do: each holds a different mix of
the classes: two sites hold one class each and cannot learn the task alone.

    python examples/images/make_data.py [--out examples/images/data] [--per-site 160]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from consortium.data.images import synthetic_images, write_image_folder

#: Each site's share of each class (horizontal stripes, vertical stripes): two sites see one class only (as
#: a clinic sees only its own kind of case) and cannot learn to tell them apart alone; the third sees both.
MIXES = ((1.0, 0.0), (0.0, 1.0), (0.6, 0.4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--per-site", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    k = len(MIXES[0])
    pool = synthetic_images(k * args.per_site * len(MIXES), size=32, n_classes=k, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    by_class = [list(rng.permutation(np.flatnonzero(pool.y == c))) for c in range(k)]
    for i, mix in enumerate(MIXES):
        counts = np.round(np.array(mix) * args.per_site).astype(int)
        rows = np.array([by_class[k].pop() for k, n in enumerate(counts) for _ in range(n)], dtype=np.int64)
        written = write_image_folder(pool.take(rows), args.out / f"site-{i + 1}")
        print(f"site-{i + 1}: {len(written)} images in {args.out / f'site-{i + 1}'}")


if __name__ == "__main__":
    main()
