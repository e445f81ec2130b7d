"""`python -m atom_jax.serve`: one process serving one model over an OpenAI-compatible HTTP API
(port 8000) and the TGIS gRPC protocol (port 50051), both on one AsyncLLM.

SIGTERM (or Ctrl-C) drains: new requests are refused (HTTP 503, gRPC UNAVAILABLE, health
NOT_SERVING), requests in flight get --shutdown-timeout seconds to finish and are then
aborted (finish reason "abort"), and the process exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import uvicorn

from atom_jax.cli_args import add_engine_args, engine_config_from_args

logger = logging.getLogger("atom_jax.serve")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atom_jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address both servers bind (default: all)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    g.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default: 50051)")
    g.add_argument("--served-model-name", default=None,
                   help=f"the model's name in the APIs (default: --model, or {DEFAULT_MODEL_NAME})")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="most sequences waiting for a batch slot; beyond it HTTP answers 503 and "
                        "gRPC RESOURCE_EXHAUSTED (default: 256)")
    g.add_argument("--api-key", default=os.environ.get("ATOM_JAX_API_KEY") or None,
                   help="require 'Authorization: Bearer <key>' on /v1 and gRPC "
                        "(default: $ATOM_JAX_API_KEY; unset: no key)")
    g.add_argument("--max-request-body-mb", type=float, default=8.0,
                   help="larger HTTP bodies are answered 413 (default: 8)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish after SIGTERM (default: 30)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_queued_requests < 1:
        print("error: --max-queued-requests must be >= 1", file=sys.stderr)
        return 2
    try:
        config = engine_config_from_args(args)
        from atom_jax.engine import EngineCore
        from atom_jax.loader import resolve_model
        _, model_path = resolve_model(config.model)
        engine = EngineCore(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    return asyncio.run(serve(args, engine, name, str(model_path)))


async def serve(args, engine, model_name: str, model_root: str) -> int:
    from atom_jax.async_llm import AsyncLLM
    from serving.grpc_server import GrpcServer
    from serving.metrics import ServingMetrics
    from serving.openai_server import OpenAIServer, build_app

    metrics = ServingMetrics(model_name)
    llm = AsyncLLM(engine, max_queued_requests=args.max_queued_requests, observer=metrics)
    metrics.bind(lambda: llm.stats)
    await llm.start()

    app = build_app(OpenAIServer(llm, model_name, model_root, metrics), api_key=args.api_key,
                    max_body_bytes=int(args.max_request_body_mb * 2**20))
    http = _UvicornServer(uvicorn.Config(app, host=args.host, port=args.port,
                                         log_level=args.log_level, access_log=args.access_log,
                                         timeout_graceful_shutdown=5))
    grpc_server = GrpcServer(llm, model_name, args.host, args.grpc_port, api_key=args.api_key)
    await grpc_server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())
    stop_task = asyncio.create_task(stop.wait())
    logger.info("serving %s: HTTP on %s:%d, gRPC on %s:%d", model_name, args.host, args.port,
                args.host, grpc_server.port)
    await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)

    logger.info("shutting down: refusing new requests, %d in flight", llm.num_in_flight)
    await grpc_server.drain()
    await llm.shutdown(timeout=args.shutdown_timeout)
    await asyncio.sleep(0.2)  # let streams send their last events
    http.should_exit = True
    await grpc_server.stop(grace=5)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(http_task, timeout=10)
    stop_task.cancel()
    logger.info("stopped")
    return 0


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server without its own signal handling (serve() drains first)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


if __name__ == "__main__":
    sys.exit(main())
