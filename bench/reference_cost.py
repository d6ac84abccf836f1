"""What reference attention costs: one guided sampling step with and without one reference picture.

    python bench/reference_cost.py [--size 512] [--repeat 2] [--eager] [--panels 1] [--references 1]

The official UNet shapes with random weights (timing does not depend on them). A step with one
reference runs the reference latent through the UNet in the same batch (rows: unconditional,
conditional, reference) and every self-attention of the panel's rows also reads the reference's tokens
(`core.diffusion.consistency`). Phases, each in its own subprocess so that its peak resident memory
(RSS high-water mark, weights included) is its own:

- `plain`: one guided step without a reference (the product's step today);
- `reference`: the same step with --references references (read everywhere);
- `regional`: the same step with each reference placed by character regions (reference j by prompt
  token 2 + j), so every transformer block also computes its maps and biases the reference keys;
- `both`: the three alternated in one process, for time ratios free of drift in the machine's load.

Each timed figure is the best of --repeat runs after one warm-up run (the compile, with the UNet
compiled as the product runs it, unless --eager). --panels n draws n panels that also share
(StoryDiffusion-style, rate 0.5) in the `reference` phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("plain", "reference", "regional", "both")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(phase: str, size: int, repeat: int, graph: bool, panels: int, refs: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from core.diffusion import WukongConfig, WukongPipeline
    from core.diffusion.consistency import Consistency

    config = WukongConfig()
    pipe = WukongPipeline.random(config, None, seed=0, graph=graph)
    side = size // config.latent_scale
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((panels, config.context_length, config.context_dim)).astype(np.float32)
    uncond = rng.standard_normal((1, config.context_length, config.context_dim)).astype(np.float32)
    x_T = rng.standard_normal((panels, 4, side, side)).astype(np.float32)
    reference = Consistency(
        references=rng.standard_normal((refs, 4, side, side)).astype(np.float32),
        steps=1.0,
        panel_rate=0.5 if panels > 1 else 0.0,
    )
    regions = np.zeros((refs, panels, config.context_length), np.float32)
    for j in range(refs):
        regions[j, :, 2 + j] = 1
    regional = replace(reference, regions=regions)

    def step(consistency: Consistency | None) -> float:
        started = time.perf_counter()
        pipe.sample(ctx, uncond, steps=1, x_T=x_T, consistency=consistency)
        return time.perf_counter() - started

    variants = {
        "plain": [None],
        "reference": [reference],
        "regional": [regional],
        "both": [None, reference, regional],
    }[phase]
    compile_s = [step(v) for v in variants]
    best = [min(step(v) for _ in range(repeat)) for v in variants]
    if phase == "both":
        # alternate, so all see the same load
        rounds = [[step(v) for v in variants] for _ in range(repeat)]
        best = [min(r[i] for r in rounds) for i in range(len(variants))]
    return {"phase": phase, "seconds": best, "first_s": compile_s, "peak_mb": round(_peak_mb())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="run the UNet eagerly, not compiled")
    parser.add_argument("--panels", type=int, default=1)
    parser.add_argument("--references", type=int, default=1)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child = _child(args.phase, args.size, args.repeat, not args.eager, args.panels, args.references)
        print(json.dumps(child))
        return
    results = {}
    for phase in PHASES:
        command = [sys.executable, __file__, "--phase", phase, "--size", str(args.size)]
        command += ["--repeat", str(args.repeat), "--panels", str(args.panels)]
        command += ["--references", str(args.references)]
        command += ["--eager"] if args.eager else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{phase}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        results[phase] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[phase]), flush=True)
    plain, ref, regional = results["plain"], results["reference"], results["regional"]
    both = results["both"]["seconds"]
    mode = "eager" if args.eager else "compiled"
    refs = f"{args.references} reference(s)"
    print(
        f"\n{args.size}x{args.size}, {args.panels} panel(s), one guided step, {mode}, best of {args.repeat}:"
    )
    print(f"  without a reference  {plain['seconds'][0]:7.2f} s   peak {plain['peak_mb']:>6} MB")
    print(f"  with {refs}   {ref['seconds'][0]:7.2f} s   peak {ref['peak_mb']:>6} MB")
    print(f"  placed by regions    {regional['seconds'][0]:7.2f} s   peak {regional['peak_mb']:>6} MB")
    print(
        f"  same process         {both[0]:7.2f} s, {both[1]:.2f} s ({both[1] / both[0]:.2f}x), "
        f"{both[2]:.2f} s ({both[2] / both[0]:.2f}x; regions {both[2] / both[1]:.2f}x the references)"
    )
    print(
        f"  extra per step       {both[1] - both[0]:7.2f} s references, {both[2] - both[1]:.2f} s regions; "
        f"peak memory {ref['peak_mb'] / plain['peak_mb']:.2f}x, "
        f"{regional['peak_mb'] / ref['peak_mb']:.2f}x the references"
    )


if __name__ == "__main__":
    main()
