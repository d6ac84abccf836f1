"""Huahua's shared asyncio core: prompt building, job queue, storage, moderation, quotas.

Imports neither a chat library nor MindSpore; the diffusion engine lives in `core.diffusion`
and is imported only when a local engine is built.
"""
