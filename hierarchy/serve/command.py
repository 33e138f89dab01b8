"""``hierarchy serve`` (the classifier over HTTP, and its page) and ``hierarchy review``
(the review page of a curated dataset)."""

from __future__ import annotations

from hierarchy.arguments import Command, allow_remote, common, count
from hierarchy.contracts import storage
from hierarchy.contracts.settings import Settings
from hierarchy.contracts.strategies import AUTO, NAMES


def _host_and_port(p) -> None:
    p.add_argument("--host", help="default serve.host")
    p.add_argument("--port", type=count(0), help="default serve.port")


def _serve_arguments(p) -> None:
    p.add_argument("--models", metavar="DIR", help="model store (default paths.models)")
    p.add_argument("--run-id", required=True, help="the trained run to serve")
    p.add_argument("--strategy", metavar="NAME",
                   help=f"default serve.strategy: {AUTO} (the run's recommended strategy), "
                        f"{', '.join(NAMES)} or a name under the configuration's variants:")
    _host_and_port(p)
    p.add_argument("--data", metavar="DIR",
                   help="also serve this curated dataset's review page at /review")
    allow_remote(p)
    common(p)


def serve(args, cfg: Settings) -> dict:
    from hierarchy.serve.app import serve

    storage.require_dir(args.models, "--models")
    if args.data:
        from hierarchy.serve.review import require_curated

        require_curated(args.data)
    serve(cfg, args.models, args.run_id, args.strategy, args.host, args.port, data=args.data,
          allow_remote=args.allow_remote)
    return {"run_id": args.run_id}


def _review_arguments(p) -> None:
    p.add_argument("--data", metavar="DIR", help="dataset folder (default paths.data)")
    _host_and_port(p)
    allow_remote(p)
    common(p)


def review(args, cfg: Settings) -> dict:
    from hierarchy.serve.review import review_server

    review_server(cfg, args.data, args.host, args.port, allow_remote=args.allow_remote)
    return {"data": args.data}


COMMANDS = (
    Command("review", help="the review page of a curated dataset (HTTP)",
            description="Serve the page that lists DATA's flagged groups with their pictures, "
                        "products and categories; a reviewer marks a picture or a group keep "
                        "/ drop / relabel, stored in DATA/reviews (the reviews table) and "
                        "honoured by the next curate and train. `hierarchy serve --data DIR` "
                        "serves the same page beside the model API.",
            add_arguments=_review_arguments, run=review, paths={"data": "data"}),
    Command("serve", help="the run's classifier over HTTP, with a page to try it",
            description="Load MODELS/RUN_ID's models once and answer POST /v1/classify "
                        "(multipart pictures of one product, or a JSON batch) with predict's "
                        "own combination; GET / is a page to try it, /docs the OpenAPI. "
                        "Ctrl-C stops it.",
            add_arguments=_serve_arguments, run=serve, paths={"models": "models"}),
)
