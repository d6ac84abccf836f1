"""Plain-text sentences every adapter shows: captions, status lines, help."""

from __future__ import annotations

from core.types import GenerationRequest, Job, JobStatus

SAMPLER_NAMES = {"dpm++2m": "DPM-Solver++ 2M", "ddim": "DDIM", "plms": "PLMS"}

HELP = """Huahua turns your words into pictures with the Wukong-Huahua model.
/imagine <text> [options] — any language in; the Chinese prompt actually used is shown with the result.
Options: --ar 3:2 (aspect ratio), --seed 7, --steps 20, --n 1..4 (pictures), --no <things to avoid>, \
--style <preset>, --guidance 7.5
/settings — show this chat's settings; /settings style <preset> sets the default style.
/share — post your latest picture (or /share story, the storybook) to the chat's gallery channel.
/story new <title> — illustrate a story together: /story for the story commands.
Buttons under a result: 🔄 reroll, V1–V4 variations, U1–U4 upscale, ❌ cancel while running."""


def prompt_lines(request: GenerationRequest) -> list[str]:
    """The Chinese prompt, or one line per panel for panels drawn together."""
    if not request.panels:
        return [f"提示词: {request.prompt}"]
    return [f"提示词 {i + 1}: {prompt}" for i, prompt in enumerate(request.panels)]


def describe(job: Job) -> str:
    """The caption under a result: the Chinese prompt(s), the seed and the parameters."""
    r = job.request
    lines = prompt_lines(r)
    if r.negative_prompt:
        lines.append(f"反向提示词: {r.negative_prompt}")
    params = [
        f"seed {r.seed}",
        f"{r.width}×{r.height}",
        f"{r.steps} steps",
        f"guidance {r.guidance_scale:g}",
        SAMPLER_NAMES.get(r.sampler, r.sampler),
    ]
    if r.panels:
        params.append(f"{r.n} panels drawn together" + (", sharing their looks" if r.panel_rate else ""))
    elif r.n > 1:
        params.append(f"{r.n} images")
    if job.kind in ("variation", "upscale") and job.parent_index is not None:
        params.append(f"{job.kind} of image {job.parent_index + 1}")
    if job.engine_label:
        params.append(job.engine_label)
    lines.append(" · ".join(params))
    lines.extend(job.notes)
    return "\n".join(lines)


def status_line(job: Job, position: int | None = None) -> str:
    """One line for a status message: queue position, progress or outcome."""
    if job.status == JobStatus.QUEUED:
        if job.error:  # a passing outage: the job waits to be tried again
            return f"⏳ {job.error}"
        where = f" — position {position} in the queue" if position else ""
        return f"⏳ Queued{where}."
    if job.status == JobStatus.RUNNING:
        return f"🎨 Drawing… {round(job.progress * 100)}%"
    if job.status == JobStatus.DONE:
        return "✅ Done."
    if job.status == JobStatus.CANCELLED:
        return "❌ Cancelled."
    return f"⚠️ {job.error or 'The job failed.'}"


def progress_bar(fraction: float, width: int = 10) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)
