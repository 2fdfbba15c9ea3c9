"""`secure-your-server serve | check-guides`."""

from __future__ import annotations

import argparse
import sys

from app.access.targets import Listener


def serve(host: str, port: int) -> None:
    import uvicorn

    from app.config import get_settings
    from app.main import create_app
    from app.serving import uvicorn_options

    settings = get_settings()
    if not settings.public_url:  # links then point where this process listens
        shown = f"[{host}]" if ":" in host else host
        settings = settings.model_copy(update={"public_url": f"http://{shown}:{port}"})
    app = create_app(settings, listeners=[Listener(host, port)])
    # uvicorn's own proxy-header handling stays OFF: by default it believes X-Forwarded-For from 127.0.0.1,
    # which would let anyone on the host aim `self` anywhere. access/requester.py alone decides.
    # the request timer and the connection caps live in our h11 protocol (app/serving.py)
    uvicorn.run(app, host=host, port=port, proxy_headers=False, server_header=False, access_log=False,
                log_level=settings.log_level.lower(), **uvicorn_options(settings))


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
    serve_cmd = commands.add_parser("serve", help="run the site (one uvicorn process)")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    commands.add_parser("check-guides", help="parse every guide and list it")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.host, args.port)
        return 0
    return check_guides()


if __name__ == "__main__":
    sys.exit(main())
