"""Long prompts across ranks from the command line: one generation, or the HTTP server on rank 0.

Launch one process per device::

    torchrun --nproc-per-node 4 -m stream_attention.cli.distributed --prompt-file long.txt
    torchrun --nproc-per-node 4 -m stream_attention.cli.distributed --serve --port 8000
    python -m stream_attention.cli.distributed --world-size 2 --prompt "..."   # spawns the ranks

The engine itself (executor, rank-0 scheduler, worker loop) is
:mod:`stream_attention.engine.distributed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from .. import envs
from ..core.config import StreamAttentionConfig
from ..core.distributed_utils import find_free_port, launch_local
from ..engine.config import EngineConfig
from ..engine.distributed import (
    MODES,
    SAFE_NCCL_ENV,
    DistributedConfig,
    DistributedLLMEngine,
    init_distributed_engine,
)
from ..engine.types import SamplingParams


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stream_attention.cli.distributed",
        description="Long-prompt generation across ranks (ring or star attention). Run under torchrun, "
        "or pass --world-size to spawn the ranks on this host.",
    )
    p.add_argument("--world-size", type=int, default=1, help="spawn this many local ranks (not under torchrun)")
    p.add_argument("--mode", choices=MODES, default="ring")
    p.add_argument("--min-prompt-tokens", type=int, default=None)
    p.add_argument("--star-query-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="path or hub id (default: the embedded model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="cpu, or cuda (one device per rank)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--serve", action="store_true", help="rank 0 runs the HTTP server (needs the server extras)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="--world-size: give up after this many s")
    return p


def _engine_from_args(args: argparse.Namespace) -> DistributedLLMEngine | None:
    distributed = DistributedConfig(
        mode=args.mode,
        min_prompt_tokens=args.min_prompt_tokens,
        star_query_tokens=args.star_query_tokens,
        attention=StreamAttentionConfig.from_env(),
    )
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len)
    return init_distributed_engine(config=config, distributed=distributed)


def _serve(engine: DistributedLLMEngine, args: argparse.Namespace) -> None:
    import asyncio

    import uvicorn

    from ..engine.async_engine import AsyncEngine
    from ..server.app import create_app
    from ..server.settings import ServerSettings

    front = AsyncEngine(engine=engine)
    asyncio.run(front.start())
    try:
        uvicorn.run(create_app(ServerSettings(), engine=front), host=args.host, port=args.port)
    finally:
        asyncio.run(front.shutdown())


def _rank_main(args: argparse.Namespace) -> dict[str, Any] | None:
    engine = _engine_from_args(args)
    if engine is None:
        return None
    with engine:
        if args.serve:
            _serve(engine, args)
            return None
        if args.prompt_file:
            with open(args.prompt_file) as fh:
                prompt = fh.read()
        else:
            prompt = args.prompt or ""
        start = time.perf_counter()
        out = engine.generate(prompt, SamplingParams(max_tokens=args.max_tokens))[0]
        return {
            "world_size": engine.world_size,
            "mode": engine.distributed.mode,
            "prompt_tokens": len(out.prompt_token_ids),
            "distributed": engine.uses_ranks(len(out.prompt_token_ids)),
            "token_ids": out.token_ids,
            "text": out.text,
            "time_to_first_token_s": out.time_to_first_token,
            "wall_s": time.perf_counter() - start,
        }


def _spawned_rank(rank: int, world: int, argv: list[str]) -> dict[str, Any] | None:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    return _rank_main(_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if not args.serve and not (args.prompt or args.prompt_file):
        _parser().error("give --prompt, --prompt-file or --serve")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.update(SAFE_NCCL_ENV)
    backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
    if envs.torchrun_launched():
        if backend == "nccl":
            torch.cuda.set_device(envs.local_rank())
        dist.init_process_group(backend)
        try:
            result = _rank_main(args)
        finally:
            dist.destroy_process_group()
    elif args.world_size > 1:
        result = launch_local(
            _spawned_rank, args.world_size, (argv,), backend=backend, timeout_s=args.timeout, env=SAFE_NCCL_ENV
        )[0]
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
        try:
            result = _rank_main(args)
        finally:
            dist.destroy_process_group()
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
