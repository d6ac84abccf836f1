"""Character consistency across a story's panels, with the real Wukong-Huahua weights: off against on.

    python bench/consistency.py [--steps 25] [--size 512] [--strength 1.0] [--out bench-out/consistency]
                                [--clip ViT-B-16] [--clip-root ~/.cache/cn_clip]

A fixed set of short Chinese stories (STORIES: 5 panels each, one or two characters, people and
animals) is planned and composed into prompts by the product's own scene planner, then drawn twice with
the same seeds: consistency off (today's prompts and seed offsets alone) and on (each character's
reference picture, drawn first from their description as a user would send one, followed by every panel
they appear in: reference attention, `core.diffusion.consistency`). Scores, with Chinese CLIP (PyPI
`cn_clip`, which downloads its own weights on first use):

- character similarity (CLIP-I): for each character, the mean pairwise cosine similarity of the image
  embeddings of the panels they appear in; higher is more consistent;
- prompt fidelity (CLIP-T): the mean cosine similarity of each panel with its own prompt; consistency
  should not cost much of it.

It needs the official weights and vocabulary (`huahua model fetch`) and says so, and exits, when they
are absent. Pictures and a JSON summary are written under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class StoryCase:
    title: str
    cast: dict[str, str]
    passages: tuple[str, ...]


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
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "consistency")
    parser.add_argument("--clip", default="ViT-B-16", help="Chinese CLIP model name")
    parser.add_argument("--clip-root", default=None, help="where cn_clip keeps its weights")
    args = parser.parse_args()

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
        import cn_clip.clip as cn_clip  # type: ignore[import-not-found]
        import torch
    except ImportError:
        print("Scoring needs Chinese CLIP: pip install cn_clip torch. Nothing was drawn.", file=sys.stderr)
        return 2
    drawn = _draw_all(args, settings)
    scores = _score(drawn, args, cn_clip, torch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(scores, ensure_ascii=False, indent=2))
    print(json.dumps(scores["overall"], ensure_ascii=False, indent=2))
    return 0


def _draw_all(args: argparse.Namespace, settings: object) -> dict[str, object]:
    """Per story title: the panels (prompt, characters present) and their pictures off and on."""
    import numpy as np

    from core.app import build_scene_planner
    from core.diffusion import WukongPipeline
    from core.diffusion.consistency import Consistency
    from core.images import array_to_pngs
    from core.prompting import load_prompt_builder
    from core.story.model import CastMember, Story
    from core.story.planner import next_continuity

    pipe = WukongPipeline.load(settings.checkpoint_path, settings.resolved_vocab_path, graph=True)  # type: ignore[attr-defined]
    builder = load_prompt_builder(settings)  # type: ignore[arg-type]
    planner = build_scene_planner(settings, builder)  # type: ignore[arg-type]
    negative = builder.negative_prompt(None)
    latent_side = args.size // pipe.config.latent_scale

    def draw(prompt: str, seed: int, consistency: Consistency | None) -> tuple[bytes, np.ndarray]:
        cond, uncond = (pipe.encode_tokens(pipe.tokenize([text])) for text in (prompt, negative))
        noise = (
            np.random.default_rng(seed).standard_normal((1, 4, latent_side, latent_side)).astype(np.float32)
        )
        latents = pipe.sample(cond, uncond, steps=args.steps, x_T=noise, seed=seed, consistency=consistency)
        return array_to_pngs(pipe.decode_latents(latents))[0], latents

    out: dict[str, object] = {}
    for number, case in enumerate(STORIES):
        cast = tuple(
            CastMember(name, description, (i + 1) * 7919)
            for i, (name, description) in enumerate(case.cast.items())
        )
        story = Story(
            id=f"b{number}",
            chat="bench",
            title=case.title,
            style=None,
            base_seed=args.seed,
            created_by="bench",
            created_at=0.0,
            cast=cast,
        )
        references: dict[str, bytes] = {}
        reference_latents: dict[str, np.ndarray] = {}
        for member in cast:
            png, latents = draw(
                f"{member.description}，全身像，简单背景", args.seed + member.seed_offset, None
            )
            references[member.name], reference_latents[member.name] = png, latents
        panels, off, on = [], [], []
        for passage in case.passages:
            plan = asyncio.run(planner.plan(passage, story))
            prompt, _ = planner.compose(plan, story)
            story = replace(story, continuity=next_continuity(plan, story.continuity))
            lead = story.member(plan.characters[0]) if plan.characters else None
            seed = args.seed + (lead.seed_offset if lead else 0)
            present = [name for name in plan.characters if name in reference_latents]
            off.append(draw(prompt, seed, None)[0])
            consistency = None
            if present:
                refs = np.concatenate([reference_latents[name] for name in present])
                consistency = Consistency(references=refs, strength=args.strength)
            on.append(draw(prompt, seed, consistency)[0])
            panels.append((prompt, list(plan.characters)))
            print(f"{case.title}: {passage} -> {prompt}", flush=True)
        folder = args.out / case.title
        folder.mkdir(parents=True, exist_ok=True)
        for i, (a, b) in enumerate(zip(off, on, strict=True)):
            (folder / f"panel{i + 1}-off.png").write_bytes(a)
            (folder / f"panel{i + 1}-on.png").write_bytes(b)
        for name, png in references.items():
            (folder / f"reference-{name}.png").write_bytes(png)
        out[case.title] = {"panels": panels, "off": off, "on": on}
    return out


def _score(
    drawn: dict[str, object], args: argparse.Namespace, cn_clip: object, torch: object
) -> dict[str, object]:
    import io

    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"  # type: ignore[attr-defined]
    model, preprocess = cn_clip.load_from_name(args.clip, device=device, download_root=args.clip_root)  # type: ignore[attr-defined]
    model.eval()

    def images(pngs: list[bytes]) -> object:
        batch = torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]).to(device)  # type: ignore[attr-defined]
        with torch.no_grad():  # type: ignore[attr-defined]
            features = model.encode_image(batch)
        return features / features.norm(dim=-1, keepdim=True)

    def texts(prompts: list[str]) -> object:
        with torch.no_grad():  # type: ignore[attr-defined]
            features = model.encode_text(cn_clip.tokenize(prompts).to(device))  # type: ignore[attr-defined]
        return features / features.norm(dim=-1, keepdim=True)

    result: dict[str, object] = {}
    totals: dict[str, list[float]] = {"clip_i_off": [], "clip_i_on": [], "clip_t_off": [], "clip_t_on": []}
    for title, story in drawn.items():
        panels = story["panels"]  # type: ignore[index]
        prompt_features = texts([prompt for prompt, _ in panels])
        entry: dict[str, object] = {}
        for mode in ("off", "on"):
            features = images(story[mode])  # type: ignore[index]
            fidelity = float((features * prompt_features).sum(-1).mean())
            per_character = {}
            names = {name for _, present in panels for name in present}
            for name in sorted(names):
                seen = [i for i, (_, present) in enumerate(panels) if name in present]
                pairs = list(itertools.combinations(seen, 2))
                if pairs:
                    per_character[name] = sum(float(features[i] @ features[j]) for i, j in pairs) / len(pairs)
            entry[mode] = {"clip_i": per_character, "clip_t": fidelity}
            totals[f"clip_t_{mode}"].append(fidelity)
            totals[f"clip_i_{mode}"].extend(per_character.values())
        result[title] = entry
    result["overall"] = {key: sum(v) / len(v) for key, v in totals.items() if v}
    return result


if __name__ == "__main__":
    sys.exit(main())
