from __future__ import annotations

import json
from dataclasses import replace

import pytest

from core.codec import job_from_dict, job_from_json, job_to_dict, job_to_json
from core.errors import StorageError
from core.types import GenerationRequest, Job, JobKind, JobStatus


def _full_job() -> Job:
    return Job(
        id="j1",
        user="tg:42",
        chat="tg:-100123",
        kind=JobKind.VARIATION,
        source_text="a cat on a roof, 屋顶上的猫",
        request=GenerationRequest(
            prompt="屋顶上的猫",
            negative_prompt="模糊",
            width=640,
            height=384,
            steps=30,
            guidance_scale=6.25,
            seed=2**40 + 3,
            n=4,
            sampler="ddim",
            init_image=b"\x89PNG not stored",
            strength=0.55,
        ),
        status=JobStatus.DONE,
        progress=1.0,
        error=None,
        images=("a" * 64, "b" * 64),
        init_image="c" * 64,
        parent_id="j0",
        parent_index=2,
        notes=("translated from English", "cut: 远处"),
        engine_label="untrained test model",
        created_at=1_700_000_000.123456,
        started_at=1_700_000_001.5,
        finished_at=1_700_000_009.25,
        meta={"tg_message": "77", "reply_to": "12"},
    )


def test_round_trip_is_exact_except_init_image_bytes() -> None:
    job = _full_job()
    back = job_from_json(job_to_json(job))
    assert back == replace(job, request=replace(job.request, init_image=None))
    assert back.request.init_image is None
    assert back.init_image == "c" * 64


def test_enums_are_strings_and_bytes_are_absent() -> None:
    data = job_to_dict(_full_job())
    assert data["kind"] == "variation" and data["status"] == "done"
    assert "init_image" not in data["request"]
    json.dumps(data)  # plain JSON types only


def test_defaults_round_trip(make_job) -> None:
    job = make_job()
    assert job_from_dict(json.loads(json.dumps(job_to_dict(job)))) == job


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("id",), 5, "'id'"),
        (("kind",), "paint", "'kind'"),
        (("status",), None, "'status'"),
        (("request", "n"), "4", "'n'"),
        (("request", "steps"), True, "'steps'"),
        (("images",), "abc", "'images'"),
        (("meta",), {"k": 1}, "'meta'"),
        (("request",), [], "job request"),
    ],
)
def test_malformed_fields_raise_storage_error(path: tuple[str, ...], value: object, fragment: str) -> None:
    data = job_to_dict(_full_job())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(StorageError, match=fragment):
        job_from_dict(data)


def test_missing_field_and_garbage_input() -> None:
    data = job_to_dict(_full_job())
    del data["created_at"]
    with pytest.raises(StorageError, match="'created_at'"):
        job_from_dict(data)
    with pytest.raises(StorageError):
        job_from_dict([1, 2])
    with pytest.raises(StorageError, match="not valid JSON"):
        job_from_json("{truncated")
