"""``gpt2lite serve``: the OpenAI-compatible server under uvicorn, the scheduler's loop on the main thread."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from gpt2lite.cli.common import (
    add_model_options,
    check_device,
    load_text_generator,
    port,
    positive,
    read_input,
    seconds,
)

__all__ = ["add_serve"]


def add_serve(commands: Any) -> None:
    """The ``serve`` command's flags: the model, the address, the limits, the shutdown."""
    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    srv.add_argument("--port", type=port, default=8000, help="port (default: 8000)")
    srv.add_argument("--max-batch", type=positive, default=16, help="requests decoded together (default: 16)")
    srv.add_argument("--max-queue", type=positive, default=256,
                     help="requests that may wait; more get 429 (default: 256)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not for /health)")
    srv.add_argument("--served-model-name", "--model-name", dest="served_model_name", default=None,
                     help="the model id clients send and /v1/models lists (default: the model folder's name)")
    srv.add_argument("--max-body-size", type=positive, default=4 * 2**20,
                     help="largest request body in bytes; larger ones get 413 (default: 4 MiB)")
    srv.add_argument("--chat-template", default=None,
                     help="a Jinja chat template file for /v1/chat/completions (default: the model's own)")
    srv.add_argument("--shutdown-timeout", type=seconds, default=30.0,
                     help="on SIGTERM or Ctrl-C, seconds to let running requests finish (default: 30)")
    srv.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    srv.add_argument("--no-prefix-cache", action="store_true",
                     help="always prefill whole prompts (default: reuse a cached shared prefix)")
    srv.add_argument("--no-playground", action="store_true", help="do not serve the playground page at /")
    srv.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                     help="web origins whose pages may call the API from a browser (CORS), or '*' for any "
                          "(default: none; the playground needs none)")
    srv.add_argument("--allowed-methods", nargs="+", default=("*",), metavar="METHOD",
                     help="methods cross-origin pages may use (default: all)")
    srv.add_argument("--allowed-headers", nargs="+", default=("*",), metavar="HEADER",
                     help="request headers cross-origin pages may send (default: all)")
    srv.add_argument("--lora", action="append", type=_lora, default=[], metavar="NAME=PATH",
                     help="serve a LoRA adapter (a PEFT directory) under its own name, chosen per request by "
                          "'model'; repeat for more")
    srv.add_argument("--max-loras", type=positive, default=None,
                     help="LoRA adapters held at once, counting those loaded at run time (default: as many as "
                          "--lora gives, at least 1)")
    add_model_options(srv)
    srv.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    try:
        import uvicorn

        from gpt2lite.serve.app import ServerOptions, create_app
    except ImportError as exc:
        raise ValueError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'gpt2lite[serve]'"
        ) from None
    name = args.served_model_name or _served_name(args.model)
    options = ServerOptions(model_name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                            api_key=args.api_key, max_body_size=args.max_body_size, docs=args.docs,
                            prefix_cache=not args.no_prefix_cache, playground=not args.no_playground,
                            allowed_origins=tuple(args.allowed_origins), allowed_methods=tuple(args.allowed_methods),
                            allowed_headers=tuple(args.allowed_headers), loras=tuple(args.lora),
                            max_loras=args.max_loras)
    template = read_input(args.chat_template, "--chat-template", is_file=True) if args.chat_template else None
    listener = _listen(args.host, args.port)  # before the model loads: a port in use fails at once
    from gpt2lite.loading import model_kind

    if model_kind(args.model, local_files_only=args.offline) == "classifier":
        return _serve_classifier(args, options, listener)
    text_generator = load_text_generator(args, args.model)
    if template is None:
        text_generator.check_chat_template()  # the model's own: a file that cannot be read stops the start
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(text_generator.model, text_generator.tokenizer, options, background=False,
                     chat_template=template if template is not None else text_generator.chat_template)
    scheduler = app.state.scheduler
    if options.playground:
        host = f"[{args.host}]" if ":" in args.host else args.host
        logging.getLogger("gpt2lite.serve").info("playground: http://%s:%d/", host, listener.getsockname()[1])
    # The scheduler's loop owns the main thread (torch runs fastest there); HTTP is served beside it.
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="gpt2lite-http", daemon=True)

    def shut_down(signum: int, frame: object) -> None:
        if scheduler.accepting:  # the first signal: finish what runs, then exit
            logging.getLogger("gpt2lite.serve").info(
                "shutting down: %d requests running, %d waiting; they may finish for %.0f s",
                scheduler.running, scheduler.queue_depth, args.shutdown_timeout)
            scheduler.drain()
            deadline = threading.Timer(args.shutdown_timeout, scheduler.stop)
            deadline.daemon = True
            deadline.start()
        else:  # a second signal: now
            scheduler.stop()

    previous = {s: signal.signal(s, shut_down) for s in (signal.SIGTERM, signal.SIGINT)}
    http.start()
    try:
        scheduler.run()  # until a drain finished, or stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        scheduler.stop()
        server.should_exit = True
        http.join(timeout=10)
        listener.close()
    return 0


def _lora(value: str) -> tuple[str, str]:
    """An argparse type: ``NAME=PATH``, vLLM's ``--lora-modules`` shape."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a name for the adapter, its directory), got {value!r}")
    return name, path


def _serve_classifier(args: argparse.Namespace, options: Any, listener: socket.socket) -> int:
    """A sequence classifier's server (``POST /classify``): uvicorn in this thread, the batches in their own."""
    import logging

    import uvicorn

    from gpt2lite.serve.app import create_app
    from gpt2lite.text.classifier import TextClassifier

    classifier = TextClassifier.from_pretrained(args.model, device=check_device(args.device), dtype=args.dtype,
                                                adapter=args.adapter, local_files_only=args.offline)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(classifier.model, classifier.tokenizer, options)
    logging.getLogger("gpt2lite.serve").info("a classifier of labels %s: POST /classify", list(classifier.labels))
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
    return 0


def _served_name(model: str) -> str:
    """The model id the server shows: a local model's folder name (a training run's own name for its ``final/``
    or ``best/``), or the hub id."""
    from pathlib import Path

    path = Path(model).expanduser()
    if path.is_file():
        path = path.parent
    if not path.exists():
        return model
    path = path.resolve()
    if path.name in ("final", "best") and (path.parent / "run.json").is_file():  # gpt2lite finetune's folders
        return path.parent.name if path.name == "final" else f"{path.parent.name}-best"
    return path.name


def _listen(host: str, port: int) -> Any:
    """A socket bound to ``host:port``; an address in use or unknown is one clear error."""

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener
