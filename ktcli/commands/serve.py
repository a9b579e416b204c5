"""Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
from __future__ import annotations

import ipaddress
from typing import Optional

import typer
from typing_extensions import Annotated

from . import options as o


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(profile: o.ProfileArg = None, model: o.Model = None, weights: o.Weights = None, dtype: o.Dtype = None,
          device: o.Device = None, num_layers: o.NumLayers = None, use_cuda_graph_kt: o.GraphKT = None,
          use_cuda_graph: o.Graph = None, graph_mode: o.GraphMode = None, max_seq_len: o.MaxLen = None,
          cpu_threads: o.Threads = None, fit: o.Fit = False,
          host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --api-key.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port, printed).")] = 8080,
          api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="KTCLI_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
          max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait behind the running one (429 beyond).")] = 8):
    from ..errors import UsageError
    from ..report.progress import stderr
    from ..server.app import Server
    from .run import load_engine
    if not _loopback(host) and not api_key:
        raise UsageError(f"--host {host} is reachable from other machines: it needs --api-key",
                         "pass --api-key KEY (or set KTCLI_API_KEY), or keep the default --host 127.0.0.1")
    flags = o.run_flags(locals())
    import socket

    import uvicorn
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)   # bound first: a taken port fails
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)                 # before minutes of loading
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}", "pick another --port") from None
    v, built, engine = load_engine(flags, fit)
    server = Server(engine, built.tokenizer, v.source.name, api_key=api_key, max_queue=max_queue)
    bound = sock.getsockname()[1]
    stderr.print(f"serving [bold]{v.source.name}[/] (graphs {engine.mode}) at http://{host}:{bound}/v1 — "
                 f"OpenAI API; Ctrl-C stops", highlight=False)
    uvicorn.Server(uvicorn.Config(server.app, log_level="warning")).run(sockets=[sock])
