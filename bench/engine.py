"""Engine benchmark: our MindSpore model and our PyTorch pipeline against diffusers at the official shapes.

    python bench/engine.py [--sizes 256,512] [--image-size 256] [--steps 20] [--repeat 1]
                           [--sides ours,torch,diffusers] [--phases text,unet,...]
    python bench/engine.py --device cuda [--dtype float16] [--compile] [--batches 8,16]

CPU mode (the default). Sides: `ours` (the MindSpore engine's modules), `torch` (our PyTorch engine,
`TorchWukongPipeline`, float32, through its numpy API as the product calls it) and `diffusers` (plain
diffusers/transformers modules of the same shapes). Phases: text encoding (batch 2: prompt and negative
prompt), one guided UNet step (batch 2) in PyNative mode and compiled as a static graph (`unet-graph`,
compared with the same PyTorch step; its compile time is reported as a note), VAE decode (batch 1) at
each of --sizes, computed in bands of rows as the pipeline does (`vae`), with every map whole
(`vae-whole`, for the memory comparison) and with the mid-block attention on the fused token-layout
kernel (`vae-fused-attn`, off in the product; bench/vae_attention.py compares the two in one process), and a
whole image (text, --steps sampling steps, decode) at --image-size, with the UNet compiled as the
product's default (HUAHUA_GRAPH_MODE=true) runs it, its compile included. Each phase reports the best
of --repeat timed runs. Weights are random (timing does not depend on them). Every phase of every side
runs in its own subprocess, one after another in one run, so the ratios compare runs minutes apart on
the same machine, and the peak resident memory (RSS high-water mark) reported is that phase's alone;
it includes the weights the phase needs. The torch and diffusers sides need the `torch` extra.

GPU mode (`--device cuda`, needs a CUDA GPU and the `torch` extra): our PyTorch engine only, at the
product's settings (float16 by default, channels-last, scaled-dot-product attention; --compile wraps
the UNet in torch.compile): seconds for one --gpu-size² image of --steps steps (DPM++ 2M, guidance 7.5,
text encoding and decode included) at batch 1, images per second at each of --batches, and the peak
GPU memory of each (torch.cuda.max_memory_allocated). One untimed run per batch size comes first.
Before timing, it prints how far the tiny model on the GPU (float32, then --dtype) draws from the CPU's
float32 (regional panels; on the CPU itself float16 gives 3e-3 and float32 0).
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
PHASES = ("text", "unet", "unet-graph", "vae", "vae-whole", "vae-fused-attn", "image")
SIDES = ("ours", "torch", "diffusers")
SAME_PYTORCH_WORK = {"unet-graph": "unet", "vae-whole": "vae", "vae-fused-attn": "vae"}
"""Phases that differ only on our MindSpore side: the PyTorch sides measure the base phase once."""
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
    if phase in ("vae", "vae-whole", "vae-fused-attn"):
        from core.diffusion.vae import DECODE_BAND_BYTES, AutoencoderKL

        vae = AutoencoderKL(cfg)
        vae.set_train(False)
        if phase == "vae-fused-attn":
            vae.decoder.mid.attn_1.kernels = True
        phase = "vae" if phase == "vae-fused-attn" else phase
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


# our PyTorch engine (TorchWukongPipeline), CPU


def _torch_ours(phase: str, size: int, steps: int, warmup: int) -> float:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from core.diffusion.config import WukongConfig
    from core.torch_engine import TorchWukongPipeline

    cfg = WukongConfig()
    pipe = TorchWukongPipeline.random(cfg, VOCAB if VOCAB.is_file() else None, seed=0)
    rng = np.random.default_rng(0)
    latent = size // cfg.latent_scale
    if phase == "text":
        ids = rng.integers(0, 21128, (2, CONTEXT_LENGTH))
        return _timed(lambda: pipe.encode_tokens(ids), warmup)
    if phase == "unet":
        x = rng.standard_normal((2, 4, latent, latent), dtype=np.float32)
        ctx = rng.standard_normal((2, CONTEXT_LENGTH, WIDTH), dtype=np.float32)
        t = np.array([500, 500])
        return _timed(lambda: pipe.predict_noise(x, t, ctx), warmup)
    if phase == "vae":
        z = rng.standard_normal((1, 4, latent, latent), dtype=np.float32)
        return _timed(lambda: pipe.decode_latents(z), warmup)

    def whole_image() -> object:
        ids = rng.integers(0, 21128, (2, CONTEXT_LENGTH))
        both = pipe.encode_tokens(ids)
        latents = pipe.sample(
            both[:1], both[1:], sampler="dpm++2m", steps=steps, seed=0, height=size, width=size
        )
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


# GPU mode: our PyTorch engine on CUDA


def _gpu_agreement(device: str, dtype: str) -> float:
    """Largest latent difference, relative to the largest latent, between the tiny model on `device`
    in `dtype` and on the CPU in float32: two guided panels with two references placed by their
    words and panel sharing, 4 DPM++ steps (the checks of tests/test_torch_engine.py, on the GPU)."""
    import numpy as np

    from core.diffusion.config import WukongConfig
    from core.diffusion.consistency import Consistency, region_masks
    from core.torch_engine import TorchWukongPipeline
    from core.vocabulary import builtin_tokenizer

    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    references = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    results = []
    for where, kind in (("cpu", "float32"), (device, dtype)):
        pipe = TorchWukongPipeline.random(
            WukongConfig.tiny(), builtin_tokenizer(), seed=5, device=where, dtype=kind
        )
        ids = pipe.tokenize(["一只在月球上看书的猫", ""])
        ctx = pipe.encode_tokens(ids)
        words = [[pipe.tokenize([word])[0][1:2]] for word in "猫书"]
        regions = region_masks(np.repeat(ids[:1], 2, axis=0), words)
        consistency = Consistency(references=references, strength=0.8, panel_rate=0.5, regions=regions)
        cond = np.repeat(ctx[:1], 2, axis=0)
        results.append(
            pipe.sample(cond, ctx[1:], consistency=consistency, sampler="dpm++2m", steps=4, x_T=x_T, seed=4)
        )
    want, got = results
    return float(np.abs(got - want).max() / np.abs(want).max())


def _gpu(opts: argparse.Namespace) -> int:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from core.diffusion.config import WukongConfig
    from core.torch_engine import TorchWukongPipeline

    if not torch.cuda.is_available():
        print("no CUDA GPU here (torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        return 2
    for dtype in dict.fromkeys(("float32", opts.dtype)):
        agreement = _gpu_agreement(opts.device, dtype)
        print(f"agreement with the CPU, tiny model, {dtype}: {agreement:.1e} relative")
    cfg = WukongConfig()
    started = time.perf_counter()
    pipe = TorchWukongPipeline.random(
        cfg, None, seed=0, device=opts.device, dtype=opts.dtype, compile=opts.compile
    )
    print(f"built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    size, steps = opts.gpu_size, opts.steps
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        ids = rng.integers(0, 21128, (2, CONTEXT_LENGTH))
        both = pipe.encode_tokens(ids)
        cond, uncond = np.repeat(both[:1], n, 0), np.repeat(both[1:], n, 0)
        latents = pipe.sample(cond, uncond, sampler="dpm++2m", steps=steps, seed=0, height=size, width=size)
        return pipe.decode_latents(latents)

    name = torch.cuda.get_device_name(opts.device)
    print(f"{name}; torch {torch.__version__}; {pipe.dtype}; compile={opts.compile}; {size}²; {steps} steps")
    print("| batch | seconds | images/s | peak GPU MB |")
    print("|---|---|---|---|")
    for n in [1, *opts.batches]:
        first = time.perf_counter()
        images(n)  # untimed: cuDNN autotuning, torch.compile for this shape
        torch.cuda.synchronize()
        warm = time.perf_counter() - first
        torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(opts.repeat):
            started = time.perf_counter()
            images(n)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"| {n} | {best:.3f} | {n / best:.2f} | {peak:,.0f} |")
        print(f"batch {n}: untimed first run {warm:.1f} s", file=sys.stderr)
    return 0


# driver


def _child(side: str, phase: str, size: int, steps: int, warmup: int, repeat: int) -> None:
    _REPEAT[0] = repeat
    run = {"ours": _ours, "torch": _torch_ours, "diffusers": _diffusers}[side]
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


def _ratio(top: Result | None, bottom: Result | None) -> float | None:
    if top is None or bottom is None or not top.seconds or not bottom.seconds:
        return None
    return top.seconds / bottom.seconds


def _table(rows: list[dict[str, Result]], sides: list[str]) -> str:
    pairs = [
        (a, b)
        for a, b in (("ours", "diffusers"), ("torch", "ours"), ("torch", "diffusers"))
        if {a, b} <= set(sides)
    ]
    head = ["phase", "size", *(f"{side} s" for side in sides), *(f"{a}/{b}" for a, b in pairs)]
    head += [f"{side} peak MB" for side in sides]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        first = next(iter(row.values()))
        cells = [first.phase, f"{first.size}²" if first.size else "77 tokens"]
        cells += [_fmt(row[side].seconds if side in row else None) for side in sides]
        cells += [_fmt(_ratio(row.get(a), row.get(b))) for a, b in pairs]
        cells += [_fmt(row[side].peak_mb if side in row else None, 0) for side in sides]
        out.append("| " + " | ".join(cells) + " |")
    seen: set[tuple[str, str, int]] = set()
    notes = []
    for row in rows:
        for r in row.values():
            if r.note and (r.side, r.phase, r.size) not in seen:
                seen.add((r.side, r.phase, r.size))
                notes.append(f"- {r.side} {r.phase} {r.size}²: {r.note}")
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
    parser.add_argument("--sides", default=",".join(SIDES), help="CPU mode: which of ours,torch,diffusers")
    parser.add_argument(
        "--skip-diffusers", action="store_true", help="the same as leaving diffusers out of --sides"
    )
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--device", default="cpu", help="cpu (every side) or cuda[:N] (GPU mode, torch only)")
    parser.add_argument("--dtype", default="float16", help="GPU mode: float16, bfloat16 or float32")
    parser.add_argument("--compile", action="store_true", help="GPU mode: torch.compile the UNet")
    parser.add_argument("--gpu-size", type=int, default=512, help="GPU mode: the image side")
    parser.add_argument("--batches", default="8,16", help="GPU mode: batch sizes after batch 1")
    opts = parser.parse_args(args)
    if opts.device != "cpu":
        opts.batches = [int(b) for b in opts.batches.split(",") if b]
        return _gpu(opts)
    sides = [
        side for side in opts.sides.split(",") if side and not (opts.skip_diffusers and side == "diffusers")
    ]
    unknown = set(sides) - set(SIDES) or set(opts.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown sides or phases: {', '.join(sorted(unknown))}")
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    plan: list[tuple[str, int]] = []
    for phase in opts.phases.split(","):
        if phase == "text":
            plan.append((phase, 0))
        elif phase == "image":
            plan.append((phase, opts.image_size))
        else:
            plan += [(phase, size) for size in sizes]
    rows: list[dict[str, Result]] = []
    measured: dict[tuple[str, str, int], Result] = {}
    for phase, size in plan:
        row: dict[str, Result] = {}
        for side in sides:
            if side == "ours":
                row[side] = _measure(side, phase, size, opts.steps, opts.warmup, opts.repeat)
                continue
            base = SAME_PYTORCH_WORK.get(phase, phase)  # the same PyTorch work, measured once
            key = (side, base, size)
            if key not in measured:
                measured[key] = _measure(side, base, size, opts.steps, opts.warmup, opts.repeat)
            row[side] = measured[key]
        rows.append(row)
        said = ", ".join(f"{side} {_fmt(result.seconds)} s" for side, result in row.items())
        print(f"{phase} {size or '-'}: {said}", file=sys.stderr)
    print(f"threads: {os.cpu_count()} cores; float32; {opts.steps} steps for the whole image")
    print(_table(rows, sides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
