"""`m2rl serve`: an OpenAI-compatible server over a checkpoint, with continuous batching.

Registering the command imports nothing heavy: torch, FastAPI and uvicorn load when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_batch": 16, "max_queue": 256}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)",
        description="Routes: /v1/completions, /v1/chat/completions, /v1/models, /v1/weights (POST a checkpoint "
                    "path to swap weights), /metrics, /health.")
    serve.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    serve.add_argument("--host", default=DEFAULTS["host"],
                       help="address to bind (default 127.0.0.1: this machine only; set --api-key before exposing it)")
    serve.add_argument("--port", type=int, default=DEFAULTS["port"], help="TCP port (default 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as `model` (default: the checkpoint directory's name)")
    serve.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"],
                       help="sequences decoded together: rows of the KV cache (default 16)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="prompt + max_tokens of one sequence: columns of the KV cache "
                            "(default: the model's max_position_embeddings, at most 4096)")
    serve.add_argument("--max-tokens-in-flight", type=int, default=0,
                       help="token budget: a request is admitted only while the sum of prompt + max_tokens over "
                            "admitted sequences fits (default: max-batch x max-model-len)")
    serve.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                       help="requests that may wait for admission; more are refused with 429 (default 256)")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weight and KV-cache dtype (default float32)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn
    from m2rl.cli import UserError, print_note
    from m2rl.model.checkpoint import read_config
    from m2rl.model.serving.app import build_app
    from m2rl.model.serving.scheduler import SchedulerConfig
    from m2rl.model.serving.service import Service
    from m2rl.model.tokenizer import TokenizerError

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    max_model_len = args.max_model_len or min(read_config(args.model).max_position_embeddings, 4096)
    try:
        config = SchedulerConfig(max_batch=args.max_batch, max_model_len=max_model_len,
                                 max_tokens_in_flight=args.max_tokens_in_flight, max_queue=args.max_queue)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        service = Service.from_checkpoint(args.model, config, args.served_model_name, device,
                                          getattr(torch, args.dtype))
    except (ValueError, TokenizerError) as exc:  # a bad flag value, a tokenizer-less directory
        raise UserError(str(exc)) from exc
    if not args.api_key and not _is_loopback(args.host):
        print_note(f"serving on {args.host} without --api-key: anyone who can reach it can use it", warning=True)
    cache_mib = service.scheduler.cache.nbytes() / 2**20
    print_note(f"serving {service.model_name!r} on http://{args.host}:{args.port}/v1 ({device}, {args.dtype}; "
               f"KV cache {config.max_batch} x {config.max_model_len} tokens, {cache_mib:.0f} MiB)")
    uvicorn.run(build_app(service, args.api_key), host=args.host, port=args.port, log_level="warning")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
