"""MindSpore process settings that must come before the first operator runs (imported by `layers`)."""

from __future__ import annotations

import logging

import mindspore as ms

logger = logging.getLogger(__name__)


def use_synchronous_cpu_launch() -> bool:
    """Run operators synchronously when the target is the CPU; True when that took effect.

    MindSpore launches PyNative operators through an asynchronous queue by default. On the CPU there is
    no device to overlap with, and the hand-off costs a thread switch per operator: the tiny UNet runs
    5x faster without it on a busy 2-core machine. The setting is read once, when the first operator
    runs, so it is applied on import, before any model code can run.
    """
    if ms.get_context("device_target") != "CPU":
        return False
    try:
        ms.runtime.launch_blocking()
    except Exception as exc:  # an older or newer MindSpore without the switch: keep its default
        logger.info("synchronous launch unavailable: %s", exc)
        return False
    return True


def on_cpu() -> bool:
    """Whether operators run on the CPU (read when a cell is built, after the pipeline chose a device)."""
    return bool(ms.get_context("device_target") == "CPU")


SYNCHRONOUS_CPU_LAUNCH = use_synchronous_cpu_launch()


def device_problem(device: str) -> str | None:
    """Why MindSpore cannot run on `device` ("GPU", "Ascend", "CPU") in this process: the first line of its
    own message, or None when it can, and then `device` is the process's target (one per process)."""
    if ms.get_context("device_target") == device:
        return None
    try:
        ms.set_device(device)
    except Exception as exc:  # its plugin (or the driver and libraries it needs) cannot load
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None
