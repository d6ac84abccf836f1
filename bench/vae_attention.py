"""The VAE decode with and without the fused attention kernel, and diffusers' decode, in one process.

    python bench/vae_attention.py [--size 512] [--rounds 3]

The three decodes (batch 1, random weights) alternate round by round in one process, so a busy machine
slows them alike: `fused` is the product's path (the mid-block attention on the fused token-layout
kernel), `generic` the same VAE with that attention on MindSpore's products and softmax (the path
before), `diffusers` plain diffusers' AutoencoderKL of the same shapes (needs the `torch` extra).
Prints each run's wall and CPU seconds, the best of each, and their ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import AutoencoderKL as DiffusersVAE
    from mindspore import Tensor

    from core.diffusion import WukongConfig
    from core.diffusion.vae import AutoencoderKL

    vae = AutoencoderKL(WukongConfig())
    vae.set_train(False)
    attn = vae.decoder.mid.attn_1
    theirs = DiffusersVAE(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    ).eval()
    z = np.random.default_rng(0).standard_normal((1, 4, opts.size // 8, opts.size // 8), dtype=np.float32)

    def ours(kernel: bool) -> np.ndarray:
        attn.kernels = kernel
        return np.asarray(vae.decode(Tensor(z)).asnumpy())

    def diffusers() -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(theirs.decode(torch.from_numpy(z)).sample.numpy())

    runs: dict[str, Callable[[], np.ndarray]] = {
        "fused": lambda: ours(True),
        "generic": lambda: ours(False),
        "diffusers": diffusers,
    }
    fused, generic = runs["fused"](), runs["generic"]()  # untimed first runs
    runs["diffusers"]()
    difference, scale = np.abs(fused - generic).max(), np.abs(generic).max()
    print(f"fused - generic: max abs {difference:.2e} (output max abs {scale:.2f})")
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(opts.rounds):
        for name, run in runs.items():
            started, cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - started)
            print(
                f"round {r} {name}: {wall[name][-1]:.2f} s wall, {time.process_time() - cpu:.2f} s cpu",
                flush=True,
            )
    best = {name: min(times) for name, times in wall.items()}
    for name, seconds in best.items():
        print(f"{name} {opts.size}²: best {seconds:.2f} s of {', '.join(f'{t:.2f}' for t in wall[name])}")
    for a, b in (("fused", "generic"), ("fused", "diffusers"), ("generic", "diffusers")):
        print(f"{a}/{b} {best[a] / best[b]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
