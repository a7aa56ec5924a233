"""`eagle3-mlx serve`: command line of the OpenAI-compatible server.

    eagle3-mlx serve [--model M] [--draft D] [--draft-source eagle|mtp|ngram|hybrid]
                     [--host 127.0.0.1] [--port 8080] [--tree auto|K,D,N]
                     [--api-key KEY] [--max-tokens-limit N] [--queue-size N]
                     [--max-body-bytes N]

Contract: ``serve_main(argv)`` loads the engine on the worker's thread (the
default model and shipped head when neither --model nor --draft is given,
resolved exactly as ``chat`` does), binds the socket, prints one ready line
to stdout (URL, model, draft, tree) and runs uvicorn until SIGTERM/SIGINT.
On a signal the running request is cancelled at its next step (its client
gets the answer so far with ``finish_reason: "cancelled"``), waiting requests
get 503, and the process exits 0. Returns 1 when the model cannot be loaded or
the address cannot be bound, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

import uvicorn

# Answers stop at the context limit anyway; this bounds one request's engine time.
DEFAULT_MAX_TOKENS_LIMIT = 8192
DEFAULT_QUEUE_SIZE = 16
DEFAULT_MAX_BODY_BYTES = 4 << 20
# After a signal: how long uvicorn waits for open responses before closing them.
GRACEFUL_SHUTDOWN_S = 10


def build_parser() -> argparse.ArgumentParser:
    from ..entry import add_model_args, add_tree_arg

    p = argparse.ArgumentParser(
        prog="eagle3-mlx serve",
        description="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health) with lossless EAGLE-3 speculative decoding. "
                    "One generation runs at a time; other requests wait in a bounded queue.")
    add_model_args(p)
    p.add_argument("--model-name", default=None,
                   help="model id reported by /v1/models and in answers "
                        "(default: the model's directory or repo name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    add_tree_arg(p)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help="largest max_tokens a request may ask for, and the default when it "
                        f"asks for none (default {DEFAULT_MAX_TOKENS_LIMIT})")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="requests that may wait while one generates; beyond it the answer "
                        f"is 429 with Retry-After (default {DEFAULT_QUEUE_SIZE})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted, in bytes (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info: one access line per request)")
    return p


def _validate(args, parser):
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in 0..65535")
    for name in ("max_tokens_limit", "queue_size", "max_body_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def _log(msg):
    print(f"eagle3-mlx serve: {msg}", file=sys.stderr, flush=True)


def make_loader(args, facts: dict):
    """The worker's loader: runs on the engine thread, returns (engine, tuner) and
    fills ``facts`` (model name, draft, tree, draft source) for the ready line."""

    def loader():
        from ..entry import EngineOptions, open_engine, resolve_target, short_name

        target = resolve_target(args.model, args.draft, _log)
        # --tree auto: the online tuner refines the tree between requests, as in chat
        engine, tuner = open_engine(EngineOptions.from_args(args), progress=_log, target=target)
        spec = engine.spec
        facts.update(model=args.model_name or target.name or short_name(target.model),
                     draft=short_name(target.draft) if target.draft else None,
                     draft_source=engine.draft_source,
                     tree=f"{spec.top_k},{spec.depth},{spec.total_tokens}" if engine.head is not None else None,
                     max_context=engine.max_context)
        return engine, tuner

    return loader


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound before uvicorn starts, so --port 0 works and the
    ready line tells the real port)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/v1"


def serve_main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _validate(args, parser)

    from .app import create_app
    from .worker import EngineWorker

    facts: dict = {}
    worker = EngineWorker(make_loader(args, facts), queue_size=args.queue_size)
    worker.start()
    try:
        worker.wait_loaded()
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        from ..entry import report_load_failure

        return report_load_failure("eagle3-mlx serve", e)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"eagle3-mlx serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        worker.shutdown()
        return 1

    app = create_app(worker, model_name=facts["model"], max_tokens_limit=args.max_tokens_limit,
                     api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     info={k: facts[k] for k in ("draft", "draft_source", "tree", "max_context")})
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = _Server(config, worker)
    tree = facts["tree"] or "none (no head)"
    print(f"eagle3-mlx serve: ready at {_url(sock)} | model {facts['model']} | "
          f"draft {facts['draft'] or 'none'} ({facts['draft_source']}) | tree {tree} | "
          f"one generation at a time, {args.queue_size} may wait", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down, with the
    # handlers it found installed; these make that a no-op so a stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    worker.shutdown()
    worker.join(GRACEFUL_SHUTDOWN_S)
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server that also stops the engine worker on SIGTERM/SIGINT, so
    the running generation ends at its next step instead of holding shutdown."""

    def __init__(self, config, worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame):
        self.worker.shutdown()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(serve_main())
