"""Embedding throughput: medfoundry's ``extract_features()`` / ``embed()`` against a bare timm forward pass.

Both sides run in the same process on the same weights, the same images and the same batch size. The bare
side is what a user would write by hand: ``timm.create_model`` from the checkpoint's ``config.json``, the
images already normalised into batches, a loop under ``torch.inference_mode``. Repetitions are interleaved
(the order rotates each round) and medians are reported, so a noisy machine shifts both sides alike. Ratios come
from wall seconds and from CPU seconds (user + system; benchmarks/_timing.py): the CPU one holds steady under load.

    python benchmarks/embed_throughput.py                 # vit_tiny_28 on all 780 BreastMNIST images
    python benchmarks/embed_throughput.py --large         # also vit_small_224 on upsampled images
    python benchmarks/embed_throughput.py --threads 1     # pin torch threads (shared machines)

The target is a ratio of at least 0.9 (medfoundry within 10% of bare timm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from medfoundry.data.registry import load_dataset
from medfoundry.data.sample import ArrayImageSet
from medfoundry.models.backbones import Encoder, create_encoder
from medfoundry.models.checkpoint import encoder_config
from medfoundry.models.features import embed, extract_features

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timer beside this script, however it is run
from _timing import Timed, median, ratio, run_timed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data" / "breastmnist" / "breastmnist.npz"
TARGET_RATIO = 0.9


def all_images(path: Path) -> np.ndarray:
    """Every image of every split, (N, C, H, W) uint8."""
    splits = load_dataset(path)
    return np.concatenate([images.images for images in splits.values()])  # type: ignore[attr-defined]


def as_image_set(images: np.ndarray, name: str) -> ArrayImageSet:
    ids = [f"{name}_{i:05d}" for i in range(len(images))]
    return ArrayImageSet(name, Path(name), images, ids, list(ids))


def bare_timm_model(encoder: Encoder) -> torch.nn.Module:
    """The network as plain timm rebuilds it from config.json, with the encoder's weights."""
    cfg = encoder_config(encoder)
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_kwargs"])
    model.load_state_dict(encoder.backbone.state_dict(), strict=True)
    return model.eval()


def normalised_batches(encoder: Encoder, images: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    x = encoder.normalize(torch.from_numpy(images))
    return [x[i : i + batch_size].contiguous() for i in range(0, len(x), batch_size)]


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([model(batch).numpy() for batch in batches])


def median_seconds(runners: dict[str, Callable[[], object]], reps: int) -> dict[str, list[Timed]]:
    """Time each runner ``reps`` times (wall and CPU), interleaved, rotating the order every round; one warm-up each
    first."""
    for run in runners.values():
        run()
    names = list(runners)
    times: dict[str, list[Timed]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run_timed(runners[name])[1])
    return times


def bench(label: str, encoder: Encoder, images: np.ndarray, batch_size: int, reps: int) -> list[dict[str, object]]:
    image_set = as_image_set(images, label)
    model = bare_timm_model(encoder)
    batches = normalised_batches(encoder, images, batch_size)

    # Same numbers on both sides, or the comparison means nothing.
    ours = extract_features(encoder, image_set, batch_size)
    theirs = bare_forward(model, batches)
    max_diff = float(np.abs(ours - theirs).max())
    assert max_diff < 1e-4, f"features differ from bare timm by {max_diff}"

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "features.h5"

        def embed_to_hdf5() -> object:
            out.unlink(missing_ok=True)  # force a recompute (hashes, forward, HDF5 write) every time
            return embed(encoder, image_set, out, batch_size)

        runners: dict[str, Callable[[], object]] = {
            "bare timm forward": lambda: bare_forward(model, batches),
            "extract_features()": lambda: extract_features(encoder, image_set, batch_size),
            "embed() in memory": lambda: embed(encoder, image_set, None, batch_size),
            "embed() -> HDF5": embed_to_hdf5,
        }
        times = median_seconds(runners, reps)

    rows = []
    for name, spans in times.items():
        seconds = [span.wall for span in spans]
        middle, speed = median(spans), ratio(times["bare timm forward"], spans)
        rows.append(
            {
                "model": label,
                "path": name,
                "images": len(images),
                "batch": batch_size,
                "median_s": middle.wall,
                "median_cpu_s": middle.cpu,
                "spread": (max(seconds) - min(seconds)) / statistics.median(seconds),
                "img_s": len(images) / middle.wall,
                "ratio": speed.wall,
                "cpu_ratio": speed.cpu,
            }
        )
    return rows


def measure_throughput(encoder_dir: Path | None = None, reps: int = 3, batch_size: int = 128) -> dict[str, float]:
    """img/s of ``embed()`` -> HDF5 and of the bare timm forward, and their ratio, on all BreastMNIST images."""
    from medfoundry.models.checkpoint import load_encoder

    # The bare side is timm's own forward, so compare on timm's own pooling.
    encoder = (
        load_encoder(encoder_dir, pool="default") if encoder_dir else create_encoder("vit_tiny_28", in_chans=1, seed=0)
    )
    rows = {r["path"]: r for r in bench("encoder", encoder, all_images(DEFAULT_DATA), batch_size, reps)}
    ours, bare = float(rows["embed() -> HDF5"]["img_s"]), float(rows["bare timm forward"]["img_s"])
    cpu_ratio = float(rows["embed() -> HDF5"]["cpu_ratio"])
    return {"medfoundry": ours, "bare": bare, "ratio": ours / bare, "cpu_ratio": cpu_ratio}


def print_table(rows: list[dict[str, object]]) -> None:
    columns = ("model", 15), ("path", 20), ("images", 7), ("batch", 6), ("median s", 9), ("spread", 7), ("img/s", 9)
    header = " ".join(f"{name:<{width}}" if i < 2 else f"{name:>{width}}" for i, (name, width) in enumerate(columns))
    header += f" {'ratio':>6} {'CPU s':>7} {'CPU ratio':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<15} {r['path']:<20} {r['images']:>7} {r['batch']:>6} {r['median_s']:>9.3f} "
            f"{r['spread']:>6.0%} {r['img_s']:>9.1f} {r['ratio']:>6.2f} "
            f"{r['median_cpu_s']:>7.3f} {r['cpu_ratio']:>9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MedMNIST npz (default: bundled BreastMNIST)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per path (median reported)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--large", action="store_true", help="also vit_small_224 on upsampled images")
    parser.add_argument("--large-images", type=int, default=64, help="images for --large")
    parser.add_argument("--large-batch-size", type=int, default=32)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    images = all_images(args.data)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} thread(s); "
        f"{len(images)} images {tuple(images.shape[1:])} from {args.data.name}; {args.reps} interleaved reps"
    )
    rows = bench("vit_tiny_28", create_encoder("vit_tiny_28", in_chans=1, seed=0), images, args.batch_size, args.reps)

    if args.large:
        small = torch.from_numpy(images[: args.large_images]).float()
        upsampled = F.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False)
        upsampled_u8 = upsampled.round().clamp(0, 255).to(torch.uint8).numpy()
        encoder = create_encoder("vit_small_224", in_chans=1, seed=0)
        rows += bench("vit_small_224", encoder, upsampled_u8, args.large_batch_size, args.reps)

    print()
    print_table(rows)
    worst = min(float(r["ratio"]) for r in rows if r["path"] != "bare timm forward")
    worst_cpu = min(float(r["cpu_ratio"]) for r in rows if r["path"] != "bare timm forward")
    verdict = "meets" if worst >= TARGET_RATIO else "misses"
    print(
        f"\nlowest medfoundry / bare ratio: wall {worst:.2f} ({verdict} the >= {TARGET_RATIO} target), "
        f"CPU {worst_cpu:.2f}"
    )


if __name__ == "__main__":
    main()
