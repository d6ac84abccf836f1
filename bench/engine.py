"""Engine benchmark: our MindSpore model against diffusers (PyTorch CPU) at the official shapes.

    python bench/engine.py [--sizes 256,512] [--image-size 256] [--steps 20] [--repeat 1] [--skip-diffusers]

Phases: text encoding (batch 2: prompt and negative prompt), one guided UNet step (batch 2) in PyNative
mode and compiled as a static graph (`unet-graph`, compared with the same diffusers step; its compile time
is reported as a note), VAE decode (batch 1) at each of --sizes, computed in bands of rows as the pipeline
does (`vae`) and with every map whole (`vae-whole`, for the memory comparison), and a whole image (text,
--steps sampling steps, decode) at --image-size, with the UNet compiled as the product's default
(HUAHUA_GRAPH_MODE=true) runs it, its compile included. Each phase reports the best of --repeat timed runs.
Weights are random (timing does not depend on them). Every phase of every side runs in its own
subprocess, so the peak resident memory (RSS high-water mark) reported is that phase's alone; it
includes the weights the phase needs. The diffusers side needs the `bench` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT.parent / "shared" / "wukong" / "vocab_zh.txt"
PHASES = ("text", "unet", "unet-graph", "vae", "vae-whole", "image")
CONTEXT_LENGTH, WIDTH = 77, 768


@dataclass(frozen=True)
class Result:
    phase: str
    size: int
    side: str
    seconds: float | None
    peak_mb: float | None
    note: str = ""
    compile_s: float | None = None


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_REPEAT = [1]
"""Timed runs per phase (the best is reported); set from --repeat in each child process."""


def _timed(run: Callable[[], object], warmup: int) -> float:
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(_REPEAT[0]):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


# our side (MindSpore)


_COMPILE: dict[str, float] = {}


def _ours(phase: str, size: int, steps: int, warmup: int) -> float:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import mindspore as ms
    from mindspore import Tensor

    from core.diffusion import (
        WukongConfig,
        runtime,  # noqa: F401  (process settings before the first operator)
    )

    cfg = WukongConfig()
    rng = np.random.default_rng(0)
    latent = size // cfg.latent_scale
    if phase == "text":
        from core.diffusion.text_encoder import TextEncoder

        encoder = TextEncoder(cfg)
        ids = Tensor(rng.integers(0, 21128, (2, CONTEXT_LENGTH)).astype(np.int32))
        return _timed(lambda: encoder(ids).asnumpy(), warmup)
    if phase in ("unet", "unet-graph"):
        from core.diffusion.unet import UNetModel

        unet = UNetModel(cfg)
        unet.set_train(False)
        x = Tensor(rng.standard_normal((2, 4, latent, latent), dtype=np.float32))
        ctx = Tensor(rng.standard_normal((2, CONTEXT_LENGTH, WIDTH), dtype=np.float32))
        t_emb = unet.embed_timesteps(np.array([500, 500]))
        step = unet
        if phase == "unet-graph":
            from core.diffusion.layers import prepare_for_graph

            prepare_for_graph(unet)  # as WukongPipeline(graph=True): no numpy inside a graph
            step = ms.jit(unet.construct)
            started = time.perf_counter()
            step(x, t_emb, ctx).asnumpy()  # compile + first run: once, whatever --repeat says
            _COMPILE["seconds"] = time.perf_counter() - started
        return _timed(lambda: step(x, t_emb, ctx).asnumpy(), warmup)
    if phase in ("vae", "vae-whole"):
        from core.diffusion.vae import DECODE_BAND_BYTES, AutoencoderKL

        vae = AutoencoderKL(cfg)
        vae.set_train(False)
        z = Tensor(rng.standard_normal((1, 4, latent, latent), dtype=np.float32))
        band_bytes = DECODE_BAND_BYTES if phase == "vae" else None
        return _timed(lambda: vae.decode(z, band_bytes).asnumpy(), warmup)
    from core.diffusion import WukongPipeline

    pipe = WukongPipeline.random(cfg, VOCAB, seed=0, graph=True)  # as the product runs it by default

    def whole_image() -> object:
        cond = pipe.encode_tokens(pipe.tokenize(["一只在月球上看书的猫"]))
        uncond = pipe.encode_tokens(pipe.tokenize([""]))
        latents = pipe.sample(cond, uncond, sampler="dpm++2m", steps=steps, seed=0, height=size, width=size)
        return pipe.decode_latents(latents)

    return _timed(whole_image, 0)


# diffusers side (PyTorch CPU)


def _diffusers(phase: str, size: int, steps: int, warmup: int) -> float:
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    latent = size // 8
    if phase in ("text", "image"):
        from transformers import CLIPTextConfig, CLIPTextModel

        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=WIDTH,
                intermediate_size=4 * WIDTH,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=CONTEXT_LENGTH,
                hidden_act="quick_gelu",
            )
        ).eval()
    if phase in ("unet", "image"):
        unet = UNet2DConditionModel(
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            cross_attention_dim=WIDTH,
            attention_head_dim=8,
        ).eval()
    if phase in ("vae", "image"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        ).eval()
    with torch.inference_mode():
        if phase == "text":
            ids = torch.randint(0, 21128, (2, CONTEXT_LENGTH))
            return _timed(lambda: text(ids).last_hidden_state, warmup)
        if phase == "unet":
            x = torch.randn(2, 4, latent, latent)
            ctx = torch.randn(2, CONTEXT_LENGTH, WIDTH)
            t = torch.tensor([500, 500])
            return _timed(lambda: unet(x, t, encoder_hidden_states=ctx).sample, warmup)
        if phase == "vae":
            z = torch.randn(1, 4, latent, latent)
            return _timed(lambda: vae.decode(z).sample, warmup)
        scheduler = DPMSolverMultistepScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
        )

        def whole_image() -> object:
            ids = torch.randint(0, 21128, (2, CONTEXT_LENGTH))
            ctx = text(ids).last_hidden_state
            scheduler.set_timesteps(steps)
            x = torch.randn(1, 4, latent, latent)
            for t in scheduler.timesteps:
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
                uncond, cond = eps.chunk(2)
                x = scheduler.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
            return vae.decode(x / 0.18215).sample

        return _timed(whole_image, 0)


# driver


def _child(side: str, phase: str, size: int, steps: int, warmup: int, repeat: int) -> None:
    _REPEAT[0] = repeat
    run = _ours if side == "ours" else _diffusers
    seconds = run(phase, size, steps, warmup)
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_mb(), "compile_s": _COMPILE.get("seconds")}))


def _measure(side: str, phase: str, size: int, steps: int, warmup: int, repeat: int) -> Result:
    cmd = [sys.executable, __file__, "--child", side, phase, str(size), str(steps), str(warmup), str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(phase, size, side, None, None, tail[:120])
    data = json.loads(lines[-1])
    first = data.get("compile_s")
    note = f"compile and first run {first:.1f} s" if first is not None else ""
    return Result(phase, size, side, data["seconds"], data["peak_mb"], note, first)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _table(rows: list[tuple[Result, Result | None]]) -> str:
    head = "| phase | size | ours s | diffusers s | ours/diffusers | ours peak MB | diffusers peak MB |"
    out = [head, "|---|---|---|---|---|---|---|"]
    for ours, theirs in rows:
        ratio = None
        if theirs and ours.seconds and theirs.seconds:
            ratio = ours.seconds / theirs.seconds
        size = f"{ours.size}²" if ours.size else "77 tokens"
        their_s, their_mb = (theirs.seconds, theirs.peak_mb) if theirs else (None, None)
        out.append(
            f"| {ours.phase} | {size} | {_fmt(ours.seconds)} | {_fmt(their_s)} | {_fmt(ratio)}"
            f" | {_fmt(ours.peak_mb, 0)} | {_fmt(their_mb, 0)} |"
        )
    notes = [f"- {r.side} {r.phase} {r.size}²: {r.note}" for pair in rows for r in pair if r and r.note]
    return "\n".join(out + notes)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--child":
        side, phase, size, steps, warmup, repeat = args[1:7]
        _child(side, phase, int(size), int(steps), int(warmup), int(repeat))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="image sides for the unet and vae phases")
    parser.add_argument("--image-size", type=int, default=256, help="image side for the whole-image phase")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each timed phase")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per phase; the best is reported")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--phases", default=",".join(PHASES))
    opts = parser.parse_args(args)
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    plan: list[tuple[str, int]] = []
    for phase in opts.phases.split(","):
        if phase == "text":
            plan.append((phase, 0))
        elif phase == "image":
            plan.append((phase, opts.image_size))
        else:
            plan += [(phase, size) for size in sizes]
    rows = []
    measured: dict[tuple[str, int], Result] = {}
    for phase, size in plan:
        ours = _measure("ours", phase, size, opts.steps, opts.warmup, opts.repeat)
        base = {"unet-graph": "unet", "vae-whole": "vae"}.get(phase, phase)  # the same diffusers work, once
        theirs = None
        if not opts.skip_diffusers:
            theirs = measured.get((base, size)) or _measure(
                "diffusers", base, size, opts.steps, opts.warmup, opts.repeat
            )
            measured[(base, size)] = theirs
        rows.append((ours, theirs))
        their_seconds = _fmt(theirs.seconds if theirs else None)
        line = f"{phase} {size or '-'}: ours {_fmt(ours.seconds)} s, diffusers {their_seconds} s"
        print(line, file=sys.stderr)
    print(f"threads: {os.cpu_count()} cores; float32; {opts.steps} steps for the whole image")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
