"""`mambadeploy serve REPO`: run the tritonserver bundled in nvidia-pytriton (serve/server.py) on a model repository
until interrupted; SIGINT / SIGTERM stop it and remove its shared memory."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("repo", help="model repository (from mambadeploy serve-repo)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--address", default="127.0.0.1", help="listen address (127.0.0.1; 0.0.0.0 for every "
                                                               "interface)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="seconds to wait for every model to be ready (120)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")


def run(args) -> int:
    import sys
    import time

    from ..interrupts import call_on_interrupt
    from ..serve.server import READY_TIMEOUT_S, STOP_TIMEOUT_S, ServeError, TritonServer

    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, address=args.address, log_verbose=args.log_verbose)
    with call_on_interrupt(server.stop):
        server.start(args.timeout or READY_TIMEOUT_S)
        print(f"ready: http {server.http_url} | grpc {server.grpc_url} | metrics {args.address}:{args.metrics_port}"
              f" | log {server.log_path}", flush=True)
        code = server.process.wait()
        if server.stopping:  # a signal: the interrupt watcher is stopping it and ends the process itself
            time.sleep(STOP_TIMEOUT_S + 5)
        reason = server.reason()
        server.stop()
    print(f"tritonserver exited with code {code}", file=sys.stderr)
    if code != 0:
        raise ServeError(f"tritonserver stopped (code {code}): {reason} (log: {server.log_path})")
    return 0
