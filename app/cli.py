"""`secure-your-server serve [--workers N] | worker [--concurrency N] | listeners | check-guides`."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from app.access.targets import Listener

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from app.config import Settings

STOP_SECONDS = 15.0  # how long `serve --workers` gives its children to stop before killing them


def _site_settings(host: str, port: int) -> Settings:
    from app.config import get_settings

    settings = get_settings()
    if not settings.public_url:  # links then point where this process listens
        shown = f"[{host}]" if ":" in host else host
        settings = settings.model_copy(update={"public_url": f"http://{shown}:{port}"})
    return settings


def _run_web(settings: Settings, host: str, port: int, sock: socket.socket | None = None) -> None:
    """One web process: on (host, port), or on `sock`, bound by the parent and shared by every worker."""
    import uvicorn

    from app.main import create_app
    from app.serving import uvicorn_options

    app = create_app(settings, listeners=[Listener(host, port)])
    # uvicorn's own proxy-header handling stays OFF: by default it believes X-Forwarded-For from 127.0.0.1,
    # which would let anyone on the host aim `self` anywhere. access/requester.py alone decides.
    # the request timer and the connection caps live in our h11 protocol (app/serving.py)
    config = uvicorn.Config(app, host=host, port=port, proxy_headers=False, server_header=False, access_log=False,
                            log_level=settings.log_level.lower(), **uvicorn_options(settings))
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)
    if not server.started:  # as uvicorn.run: a port in use, a failed startup
        sys.exit(3)


def serve(host: str, port: int, workers: int = 1) -> int:
    settings = _site_settings(host, port)
    if workers <= 1:
        _run_web(settings, host, port)
        return 0
    return _serve_workers(settings, host, port, workers)


def _serve_workers(settings: Settings, host: str, port: int, workers: int) -> int:
    """`serve --workers N`: the port bound once here, N web processes accepting on it, and (SECURE_LISTENERS=
    embedded) one listeners process: the sink and canaries bind once, the workers run as `external`. This process
    only watches: when one child exits, or on SIGTERM / SIGINT, it stops them all."""
    import multiprocessing

    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=2048)
    context = multiprocessing.get_context("fork")  # the children inherit the bound socket
    children: list[BaseProcess] = []
    if settings.listeners == "embedded":
        children.append(context.Process(target=_run_listeners, args=(settings, sock), name="listeners"))
        settings = settings.model_copy(update={"listeners": "external"})
    children += [context.Process(target=_run_web, args=(settings, host, port, sock), name=f"web-{n}")
                 for n in range(workers)]
    for child in children:
        child.start()
    sock.close()
    return _watch(children)


def _run_listeners(settings: Settings, web_socket: socket.socket) -> None:
    from app import listener_process

    web_socket.close()  # the workers' socket, inherited: this process never accepts on it
    listener_process.main(settings)


def _watch(children: list[BaseProcess]) -> int:
    from multiprocessing.connection import wait

    stopping: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    while not stopping and all(child.is_alive() for child in children):
        wait([child.sentinel for child in children], timeout=0.5)
    for child in children:
        if child.is_alive():
            child.terminate()
    for child in children:
        child.join(STOP_SECONDS)
        if child.is_alive():
            child.kill()
            child.join(STOP_SECONDS)
    return 0 if stopping else 1


def listeners() -> int:
    from app import listener_process
    from app.config import get_settings

    listener_process.main(get_settings())
    return 0


def worker(concurrency: int) -> int:
    from app import worker as audit_worker
    from app.config import get_settings

    return audit_worker.main(get_settings(), concurrency)


def check_guides() -> int:
    from app import PROJECT_ROOT
    from app.guides import GuideError, GuideLibrary

    root = PROJECT_ROOT / "guides"
    try:
        library = GuideLibrary(root)
    except GuideError as exc:
        print(f"guide error: {exc}", file=sys.stderr)
        return 1
    for guide in library.all():
        print(f"{guide.service:8} {guide.slug:32} {guide.title}")
    problems = library.problems()
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(library.guides)} guides, {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"{len(library.guides)} guides OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secure-your-server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the site")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--workers", type=int, default=1,
                           help="web processes sharing the port (one per core); above 1, the sink and canaries run "
                                "in one listeners process of their own")
    worker_cmd = commands.add_parser("worker", help="run audits from the job queue (SECURE_DATABASE_URL=postgresql://)")
    worker_cmd.add_argument("--concurrency", type=int, default=0,
                            help="audits this worker runs at once (default: SECURE_MAX_RUNNING_AUDITS; the site-wide "
                                 "cap holds whatever the number of workers)")
    commands.add_parser("listeners", help="run only the sink and the canaries (SECURE_LISTENERS=external)")
    commands.add_parser("check-guides", help="parse every guide and list it")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port, max(1, args.workers))
    if args.command == "listeners":
        return listeners()
    if args.command == "worker":
        return worker(max(0, args.concurrency))
    return check_guides()


if __name__ == "__main__":
    sys.exit(main())
