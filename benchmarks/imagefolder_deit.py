"""Benchmark: a DeiT-S-shaped tiny model, started from a weights file, swept on an image folder with a domain level.

The stand-in for docs/models-and-data.md's pretrained DeiT-S sweep where no pretrained weights can be had (no
network, no cached copy): it writes

- an image folder `OUT/digits/<domain>/<class>/*.png`: the 1,797 8x8 digits (the embedded default's images) in two
  domains, `ink` and `negative` (the same digits inverted);
- `OUT/deit-s-tiny.safetensors`: timm's `deit_small_patch16_224` built with the --model-arg options below and a
  1000-class head (ImageNet's count, so the run drops it and seeds its own, as with a real pretrained file);

then runs the sweep as a user would (`fedsens sweep ... --scheme domain`, FedAvg and two parts, one seed) and
prints its wall time and each cell's seconds per round and last-round accuracy. Not a test: from the repository
root, `.venv/bin/python benchmarks/imagefolder_deit.py --out /tmp/deit-folder [--rounds 20]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

NAME = "deit_small_patch16_224"
# DeiT-S itself: img_size 224, patch_size 16, embed_dim 384, depth 12, num_heads 6
MODEL_ARGS = {"img_size": 32, "patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 3}


def write_folder(root: Path) -> int:
    digits = load_digits()
    ink = (digits.images * (255 / 16)).round().astype(np.uint8)
    for domain, images in (("ink", ink), ("negative", 255 - ink)):
        for index, (image, label) in enumerate(zip(images, digits.target)):
            path = root / domain / str(label) / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return 2 * len(ink)


def write_weights(path: Path) -> int:
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=1000, **MODEL_ARGS)
    save_file({key: tensor.contiguous() for key, tensor in model.state_dict().items()}, str(path))
    return sum(p.numel() for p in model.parameters())


def sweep_command(out: Path, rounds: int) -> list[str]:
    flags = [arg for key, value in MODEL_ARGS.items() for arg in ("--model-arg", f"{key}={value}")]
    return [
        *("fedsens", "sweep", "--model", NAME, *flags, "--weights", str(out / "deit-s-tiny.safetensors")),
        *("--dataset", "imagefolder", "--data-root", str(out / "digits"), "--scheme", "domain"),
        *("--parts", "attn", "--parts", "head", "--only-parts", "--seeds", "0", "--rounds", str(rounds)),
        *("--clients", "8", "--jobs", "1", "--quiet", "--fresh", "--out", str(out / "sweep")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    print(f"image folder: {write_folder(options.out / 'digits')} images in 2 domains x 10 classes")
    print(f"weights file: {write_weights(options.out / 'deit-s-tiny.safetensors'):,} parameters, 1000-class head")
    command = sweep_command(options.out, options.rounds)
    print("$", " ".join(command))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedsens.cli", *command[1:]], check=True)
    wall = time.perf_counter() - started
    print(f"sweep wall time: {wall:.0f} s (imports and the image decode included)")
    for cell in sorted((options.out / "sweep" / "cells").iterdir()):
        summary = json.loads((cell / "summary.json").read_text())
        print(
            f"  {cell.name}: {summary['seconds_per_round']:.2f} s/round over {summary['rounds']} rounds, "
            f"mean client accuracy {summary['acc_last']:.3f} at the last round"
        )


if __name__ == "__main__":
    main()
