"""Character consistency across a story's panels, with the real Wukong-Huahua weights: off, on, together.

    python bench/consistency.py [--steps 25] [--size 512] [--strength 1.0] [--panel-rate 0.5]
                                [--seed 1234] [--out bench-out/consistency]
                                [--clip ViT-B-16] [--clip-root ~/.cache/cn_clip]
                                [--engine wukong|torch] [--device auto] [--dtype auto]

A fixed set of short Chinese stories (STORIES: 5 panels each, one or two characters, people and
animals) is planned and composed into prompts by the product's own scene planner. Each character first
gets a reference picture, drawn from their description as a user would send one. Every story is then
drawn three ways, as the product draws it (`core.diffusion.consistency`):

- off: each panel alone, from its prompt and the product's seed (the story's seed plus its lead
  character's offset), no consistency;
- on: each panel alone, with the same seed, following the reference latents of the characters in it
  (`Consistency(references=..., strength=...)`), each reference placed where its character's
  description stands in the prompt (`Consistency.regions`, from `region_masks`), as the product does;
- together: the 5 panels as one batch, as `/illustrate 5` draws them (`core.story.book._drawn_together`,
  `LocalEngine._run_batch`): panel i from the first panel's seed + i, each panel reading a share
  (--panel-rate, default the product's PANEL_RATE) of the others' tokens, every character's reference
  once, and each reference placed by its character's description in every panel's prompt.

The together batch is 5 guided panels (10 UNet rows) plus the references: about 12 UNet rows at
512x512: fine on a GPU or an Ascend card, slow on a CPU.

Scores, with Chinese CLIP (PyPI `cn_clip`, which downloads its own weights on first use), per condition:

- character similarity (CLIP-I): for each character, the mean pairwise cosine similarity of the image
  embeddings of the panels they appear in; higher is more consistent;
- prompt fidelity (CLIP-T): the mean cosine similarity of each panel with its own prompt; consistency
  should not cost much of it.

It needs the official weights and vocabulary (`huahua model fetch`) and says so, and exits with 2,
having drawn nothing, when they are absent (likewise without `cn_clip`). Pictures (`reference-<name>.png`,
`panel<N>-<condition>.png` per story) and `summary.json` are written under --out; the overall table is
printed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.diffusion.consistency import Consistency, region_masks  # noqa: E402
from core.errors import InvalidOption  # noqa: E402
from core.story.book import PANEL_RATE, scene_references  # noqa: E402

CONDITIONS = ("off", "on", "together")


@dataclass(frozen=True)
class StoryCase:
    title: str
    cast: dict[str, str]
    passages: tuple[str, ...]


@dataclass(frozen=True)
class Options:
    """How every picture is drawn."""

    steps: int = 25
    size: int = 512
    strength: float = 1.0
    panel_rate: float = PANEL_RATE
    seed: int = 1234


@dataclass(frozen=True)
class Panel:
    prompt: str
    seed: int
    characters: tuple[str, ...]


@dataclass(frozen=True)
class DrawnStory:
    panels: tuple[Panel, ...]
    references: dict[str, bytes]
    """Each character's reference picture (PNG)."""
    pictures: dict[str, list[bytes]]
    """Per condition (CONDITIONS), one PNG per panel."""


STORIES = (
    StoryCase(
        "小红帽",
        {"莉莉": "穿红色斗篷、扎两条辫子的小女孩"},
        (
            "清晨，莉莉提着篮子走出家门。",
            "莉莉走进了幽深的森林。",
            "莉莉在小河边摘了一束野花。",
            "傍晚，莉莉来到外婆的小木屋前。",
            "莉莉坐在壁炉旁给外婆讲故事。",
        ),
    ),
    StoryCase(
        "橘猫阿福",
        {"阿福": "一只胖胖的橘色小猫，戴着蓝色项圈"},
        (
            "阿福在窗台上晒太阳。",
            "阿福跳进了花园里追蝴蝶。",
            "下雨了，阿福躲在一把大伞下面。",
            "夜里，阿福趴在屋顶上看月亮。",
            "第二天清晨，阿福在厨房里等早饭。",
        ),
    ),
    StoryCase(
        "小明和大黄",
        {"小明": "穿黄色雨衣、戴圆眼镜的小男孩", "大黄": "一只金黄色的大狗"},
        (
            "小明牵着大黄走在村口的小路上。",
            "大黄在草地上奔跑。",
            "小明和大黄一起坐在湖边钓鱼。",
            "下雪了，小明给大黄围上一条围巾。",
            "晚上，小明抱着大黄在灯下睡着了。",
        ),
    ),
    StoryCase(
        "宇航员",
        {"星星": "穿白色宇航服、头盔上有红色条纹的年轻女宇航员"},
        (
            "星星在发射台前向大家挥手。",
            "星星在飞船里透过舷窗看地球。",
            "星星在月球表面插下一面小旗。",
            "星星在月球基地里种下一棵小树苗。",
            "星星回到地球，在海边看日出。",
        ),
    ),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Options.steps)
    parser.add_argument("--size", type=int, default=Options.size)
    parser.add_argument("--strength", type=float, default=Options.strength)
    parser.add_argument(
        "--panel-rate",
        type=float,
        default=Options.panel_rate,
        help="share of the other panels' tokens each panel drawn together reads (the product: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "consistency")
    parser.add_argument("--clip", default="ViT-B-16", help="Chinese CLIP model name")
    parser.add_argument("--clip-root", default=None, help="where cn_clip keeps its weights")
    parser.add_argument(
        "--engine", choices=("wukong", "torch"), default="wukong", help="MindSpore (wukong) or PyTorch"
    )
    parser.add_argument("--device", default="auto", help="torch engine: cuda, mps, cpu or auto")
    parser.add_argument("--dtype", default="auto", help="torch engine: float16, bfloat16, float32 or auto")
    args = parser.parse_args()
    options = Options(args.steps, args.size, args.strength, args.panel_rate, args.seed)
    try:  # the product's own limits, checked before anything is loaded
        Consistency(strength=options.strength, panel_rate=options.panel_rate)
    except InvalidOption as exc:
        parser.error(exc.message)

    from core.settings import Settings

    settings = Settings()
    checkpoint, vocab = settings.checkpoint_path, settings.resolved_vocab_path
    missing = [str(p) for p in (checkpoint, vocab) if p is None or not Path(p).is_file()]
    if missing:
        print(
            "The official Wukong-Huahua weights are not here (" + ", ".join(missing) + "): this evaluation "
            "needs them. Download them with `huahua model fetch` (HUAHUA_MODEL_DIR sets where), then run it "
            "again. Nothing was drawn.",
            file=sys.stderr,
        )
        return 2
    try:
        import cn_clip.clip as cn_clip
        import torch
    except ImportError:
        print("Scoring needs Chinese CLIP: pip install cn_clip torch. Nothing was drawn.", file=sys.stderr)
        return 2

    from core.app import build_scene_planner
    from core.prompting import load_prompt_builder

    if args.engine == "torch":  # an NVIDIA (or Apple) GPU: the PyTorch engine, same pictures per seed
        from core.torch_engine import TorchWukongPipeline

        pipe: Any = TorchWukongPipeline.load(checkpoint, vocab, device=args.device, dtype=args.dtype)
    else:
        from core.diffusion import WukongPipeline

        pipe = WukongPipeline.load(checkpoint, vocab, graph=True)
    builder = load_prompt_builder(settings)
    planner = build_scene_planner(settings, builder)
    negative = builder.negative_prompt(None)
    drawn: dict[str, DrawnStory] = {}
    for number, case in enumerate(STORIES):
        drawn[case.title] = draw_story(pipe, planner, negative, case, options, story_id=f"b{number}")
        write_pictures(drawn[case.title], args.out / case.title)
    scores = _score(drawn, args.clip, args.clip_root, cn_clip, torch)
    summary = {"options": asdict(options), **scores}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2))
    print(overall_table(scores["overall"]))
    return 0


# drawing ---------------------------------------------------------------------------------------------


def draw_story(
    pipe: Any, planner: Any, negative: str, case: StoryCase, options: Options, *, story_id: str = "bench"
) -> DrawnStory:
    """The story's references, then its panels drawn off, on and together (see the module docstring)."""
    from core.story.model import CastMember, Story
    from core.story.planner import next_continuity

    # each member's reference "digest" is their name: the product's scene_references then picks the
    # references of a panel (present characters, each once, at most MAX_REFERENCES) and their words
    cast = tuple(
        CastMember(name, description, (i + 1) * 7919, reference=name)
        for i, (name, description) in enumerate(case.cast.items())
    )
    story = Story(
        id=story_id,
        chat="bench",
        title=case.title,
        style=None,
        base_seed=options.seed,
        created_by="bench",
        created_at=0.0,
        cast=cast,
        consistency=options.strength,
    )
    references: dict[str, bytes] = {}
    reference_latents: dict[str, np.ndarray] = {}
    for member in cast:
        png, latents = draw_alone(
            pipe,
            f"{member.description}，全身像，简单背景",
            negative,
            options.seed + member.seed_offset,
            options,
        )
        references[member.name], reference_latents[member.name] = png, latents

    panels: list[Panel] = []
    off: list[bytes] = []
    on: list[bytes] = []
    for passage in case.passages:
        plan = asyncio.run(planner.plan(passage, story))
        prompt, _ = planner.compose(plan, story)
        story = replace(story, continuity=next_continuity(plan, story.continuity))
        lead = story.member(plan.characters[0]) if plan.characters else None
        seed = (story.base_seed + (lead.seed_offset if lead else 0)) % 2**32
        panels.append(Panel(prompt, seed, tuple(plan.characters)))
        off.append(draw_alone(pipe, prompt, negative, seed, options)[0])
        followed = scene_references(story, plan.characters)
        consistency = None
        if followed:
            names, words = zip(*followed, strict=True)
            prompt_tokens = pipe.tokenize([prompt])
            consistency = Consistency(
                references=np.concatenate([reference_latents[name] for name in names]),
                strength=options.strength,
                # each reference placed by its character's words, as the product does
                regions=character_regions(pipe, prompt_tokens, words),
            )
        on.append(draw_alone(pipe, prompt, negative, seed, options, consistency)[0])
        print(f"{case.title}: {passage} -> {prompt}", flush=True)

    everyone = scene_references(story, tuple(name for panel in panels for name in panel.characters))
    together = draw_together(
        pipe,
        [panel.prompt for panel in panels],
        negative,
        panels[0].seed,
        options,
        references=np.concatenate([reference_latents[name] for name, _ in everyone]) if everyone else None,
        words=[words for _, words in everyone],
    )
    print(f"{case.title}: {len(panels)} panels drawn together", flush=True)
    return DrawnStory(tuple(panels), references, {"off": off, "on": on, "together": together})


def draw_alone(
    pipe: Any,
    prompt: str,
    negative: str,
    seed: int,
    options: Options,
    consistency: Consistency | None = None,
) -> tuple[bytes, np.ndarray]:
    """One picture (PNG) and its final latents (1, 4, h, w)."""
    latents = _sample(pipe, pipe.tokenize([prompt]), negative, seed, options, consistency)
    return _pngs(pipe, latents)[0], latents


def draw_together(
    pipe: Any,
    prompts: Sequence[str],
    negative: str,
    seed: int,
    options: Options,
    *,
    references: np.ndarray | None,
    words: Sequence[str],
) -> list[bytes]:
    """The panels as one batch, picture i from prompts[i] and seed + i, sharing attention as /illustrate
    N does: options.panel_rate of each other panel's tokens, the references (r, 4, h, w) and, for
    each, the regions of its character's words (words[r]) in every panel's prompt."""
    prompt_tokens = pipe.tokenize(list(prompts))
    consistency = Consistency(
        references=references,
        strength=options.strength,
        panel_rate=options.panel_rate,
        regions=None if references is None else character_regions(pipe, prompt_tokens, words),
    )
    return _pngs(pipe, _sample(pipe, prompt_tokens, negative, seed, options, consistency))


def character_regions(pipe: Any, prompt_tokens: np.ndarray, words: Sequence[str]) -> np.ndarray:
    """(r, panels, L): where each reference's character's words stand in each panel's prompt tokens."""
    return region_masks(prompt_tokens, [[_phrase(pipe, text)] for text in words])


def _phrase(pipe: Any, text: str) -> np.ndarray:
    """The token ids of `text` as they stand inside a prompt (as `LocalEngine._phrase`)."""
    ids = list(pipe.tokenize([text])[0])
    return np.asarray(ids[1 : ids.index(pipe.tokenizer.sep_id)], np.int64)


def _sample(
    pipe: Any,
    prompt_tokens: np.ndarray,
    negative: str,
    seed: int,
    options: Options,
    consistency: Consistency | None,
) -> np.ndarray:
    """Final latents of one batch as the local engine samples it: one text-encoder call for the prompts
    and their negatives, the noise of seed + i for picture i."""
    from core.engines.local import initial_noise

    count = len(prompt_tokens)
    both = pipe.encode_tokens(np.concatenate([prompt_tokens, pipe.tokenize([negative] * count)]))
    config = pipe.config
    side = options.size // config.latent_scale
    x_T = initial_noise([seed + i for i in range(count)], (config.latent_channels, side, side))
    return np.asarray(
        pipe.sample(
            both[:count], both[count:], steps=options.steps, x_T=x_T, seed=seed, consistency=consistency
        ),
        np.float32,
    )


def _pngs(pipe: Any, latents: np.ndarray) -> list[bytes]:
    from core.images import array_to_pngs

    return array_to_pngs(np.asarray(pipe.decode_latents(latents), np.float32))


def write_pictures(drawn: DrawnStory, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, png in drawn.references.items():
        (folder / f"reference-{name}.png").write_bytes(png)
    for condition, pictures in drawn.pictures.items():
        for i, png in enumerate(pictures):
            (folder / f"panel{i + 1}-{condition}.png").write_bytes(png)


# scoring ---------------------------------------------------------------------------------------------


def _score(
    drawn: dict[str, DrawnStory], clip_name: str, clip_root: str | None, cn_clip: Any, torch: Any
) -> dict[str, Any]:
    """Per story and condition: CLIP-I per character and CLIP-T; overall: their means per condition."""
    import io

    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, preprocess = cn_clip.load_from_name(clip_name, device=device, download_root=clip_root)
    model.eval()

    def images(pngs: list[bytes]) -> Any:
        batch = torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]).to(device)
        with torch.no_grad():
            features = model.encode_image(batch)
        return features / features.norm(dim=-1, keepdim=True)

    def texts(prompts: list[str]) -> Any:
        with torch.no_grad():
            features = model.encode_text(cn_clip.tokenize(prompts).to(device))
        return features / features.norm(dim=-1, keepdim=True)

    stories: dict[str, Any] = {}
    clip_i: dict[str, list[float]] = {condition: [] for condition in CONDITIONS}
    clip_t: dict[str, list[float]] = {condition: [] for condition in CONDITIONS}
    for title, story in drawn.items():
        prompt_features = texts([panel.prompt for panel in story.panels])
        names = sorted({name for panel in story.panels for name in panel.characters})
        entry: dict[str, Any] = {}
        for condition in CONDITIONS:
            features = images(story.pictures[condition])
            fidelity = float((features * prompt_features).sum(-1).mean())
            per_character: dict[str, float] = {}
            for name in names:
                seen = [i for i, panel in enumerate(story.panels) if name in panel.characters]
                pairs = list(itertools.combinations(seen, 2))
                if pairs:
                    per_character[name] = sum(float(features[i] @ features[j]) for i, j in pairs) / len(pairs)
            entry[condition] = {"clip_i": per_character, "clip_t": fidelity}
            clip_t[condition].append(fidelity)
            clip_i[condition].extend(per_character.values())
        stories[title] = entry
    overall = {
        condition: {"clip_i": _mean(clip_i[condition]), "clip_t": _mean(clip_t[condition])}
        for condition in CONDITIONS
    }
    return {"stories": stories, "overall": overall}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def overall_table(overall: dict[str, dict[str, float | None]]) -> str:
    """The overall scores, one row per condition."""
    lines = [f"{'condition':<10} {'CLIP-I':>8} {'CLIP-T':>8}"]
    for condition, scores in overall.items():
        cells = ["-" if scores[key] is None else f"{scores[key]:.4f}" for key in ("clip_i", "clip_t")]
        lines.append(f"{condition:<10} {cells[0]:>8} {cells[1]:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
