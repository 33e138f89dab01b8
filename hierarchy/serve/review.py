"""The review page of a curated dataset: flagged groups with their pictures, products and
categories; a reviewer marks a picture or a whole group keep / drop / relabel.

    GET  /review                      the page (static, from the package: no build, no CDN)
    GET  /review/api/groups           the review queue, most urgent first, with decisions
    GET  /review/api/categories       category ids and names (for relabelling)
    GET  /review/picture/{pid}/{idx}  a queued picture's JPEG, bytes as ingested
    POST /review/api/decisions        {"reviewer", "decision": keep|drop|relabel,
                                       "category_id" (relabel), "group" or "pictures":
                                       [[product_id, img_idx], ...], "note"}; same origin,
                                       application/json, the server's token in
                                       X-Review-Token (:mod:`hierarchy.serve.guard`), under
                                       serve.review_max_body_bytes, only queued pictures

The queue is what ``hierarchy curate`` wrote to ``curation_report/review/``; decisions go to
``reviews/`` (one new file per decision: :func:`hierarchy.contracts.curation.append_reviews`), which
the next curate and every training read. A group decision is recorded for every member of the
group, not only the pictures shown.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Dict, List

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from hierarchy.contracts import curation as ct
from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset
from hierarchy.contracts.errors import Refused
from hierarchy.contracts.settings import Serve, Settings
from hierarchy.serve import guard

STATIC = Path(__file__).resolve().parent / "static"
MAX_TEXT = 2000  # characters of a reviewer's name or note


class NotCurated(Refused, RuntimeError):
    pass


def _queue_dir(data: str) -> str:
    return storage.join(ct.report_path(data), "review")


def require_curated(data: str) -> None:
    if not storage.exists(storage.join(_queue_dir(data), "groups")):
        raise NotCurated(f"{data}: no review queue — run `hierarchy curate --data {data}` first")


class ReviewQueue:
    """The queue and its pictures, read once (bounded by curate.review_max_groups x
    curate.review_pictures); decisions are re-read on every listing (other reviewers')."""

    def __init__(self, data: str):
        require_curated(data)
        self.data = data
        self.groups: List[dict] = storage.read_parquet(
            storage.join(_queue_dir(data), "groups")).to_pylist()
        self.groups.sort(key=lambda g: g["position"])
        self.by_id: Dict[str, dict] = {g["review_group"]: g for g in self.groups}
        # a decision names only pictures of the queue: the reviews table is read by every
        # training, so nothing else may reach it through this page
        self.queued = {(int(m["product_id"]), int(m["img_idx"]))
                       for g in self.groups for m in g["members"]}
        self.pictures: Dict[tuple, bytes] = {}
        self.shown: Dict[str, List[dict]] = {}
        for p in storage.read_parquet(storage.join(_queue_dir(data), "pictures")).to_pylist():
            self.pictures[(p["product_id"], p["img_idx"])] = p["jpeg"]
            self.shown.setdefault(p["review_group"], []).append(
                {k: p[k] for k in ("product_id", "img_idx", "split", "category_id")})
        for v in self.shown.values():
            v.sort(key=lambda p: (p["product_id"], p["img_idx"]))
        tax = Dataset(data).taxonomy()
        self.categories = [{"category_id": int(c), "name": " / ".join(tax.names_of_l3(i))}
                           for i, c in enumerate(tax.category_ids)]
        self.known = {c["category_id"] for c in self.categories}
        self.lock = threading.Lock()

    def listing(self, offset: int, limit: int) -> dict:
        latest = ct.latest_reviews(self.data)
        out = []
        for g in self.groups[offset:offset + limit]:
            keys = [int(ct.picture_key(m["product_id"], m["img_idx"])) for m in g["members"]]
            decided = [latest[k] for k in keys if k in latest]
            status = None
            if decided and len(decided) == len(keys) and \
                    len({(d["decision"], d["category_id"]) for d in decided}) == 1:
                status = {"decision": decided[0]["decision"],
                          "category_id": decided[0]["category_id"],
                          "reviewer": decided[0]["reviewer"],
                          "decided_at": decided[0]["decided_at"].isoformat()}
            out.append({"group": g["review_group"], "flags": g["flags"], "reason": g["reason"],
                        "pictures": g["pictures"], "products": g["products"],
                        "categories": g["categories"],
                        "category_counts": g["category_counts"],
                        "shown": [{**p, "decision": (latest.get(int(ct.picture_key(
                            p["product_id"], p["img_idx"]))) or {}).get("decision")}
                            for p in self.shown.get(g["review_group"], [])],
                        "decided": len(decided), "status": status})
        return {"total": len(self.groups), "offset": offset, "groups": out}

    def decide(self, body: dict) -> dict:
        reviewer = str(body.get("reviewer") or "").strip()
        decision = body.get("decision")
        if not reviewer:
            raise ValueError("who is deciding? 'reviewer' is required")
        if len(reviewer) > MAX_TEXT or len(str(body.get("note") or "")) > MAX_TEXT:
            raise ValueError(f"'reviewer' and 'note' are at most {MAX_TEXT} characters")
        if decision not in ct.DECISIONS:
            raise ValueError(f"decision {decision!r}: one of {', '.join(ct.DECISIONS)}")
        category = body.get("category_id")
        if decision == "relabel":
            category = _whole(category, "relabel needs 'category_id', an integer")
            if category not in self.known:
                raise ValueError(f"category {category} is not in the dataset's taxonomy")
        else:
            category = None
        if body.get("group") is not None:
            group = self.by_id.get(str(body["group"]))
            if group is None:
                raise LookupError(f"group {body['group']} is not in the review queue")
            target, members = "group", [(m["product_id"], m["img_idx"])
                                        for m in group["members"]]
            group_id = group["review_group"]
        else:
            pics = body.get("pictures")
            if not isinstance(pics, list) or not pics:
                raise ValueError("send 'group' or 'pictures': [[product_id, img_idx], ...]")
            shape = "'pictures' must be [[product_id, img_idx], ...] (integers)"
            if not all(isinstance(p, list) and len(p) == 2 for p in pics):
                raise ValueError(shape)
            members = list(dict.fromkeys((_whole(p[0], shape), _whole(p[1], shape))
                                         for p in pics))
            outside = [m for m in members if m not in self.queued]
            if outside:
                raise LookupError(f"picture {outside[0][0]}/{outside[0][1]} is not in the "
                                  f"review queue ({len(outside)} of {len(members)} are not)")
            group_id = body.get("group_id")
            target, group_id = "picture", None if group_id is None else str(group_id)[:MAX_TEXT]
        rows = [{"target": target, "group_id": group_id, "product_id": pid, "img_idx": idx,
                 "decision": decision, "category_id": category, "reviewer": reviewer,
                 "note": None if body.get("note") is None else str(body["note"])}
                for pid, idx in members]
        with self.lock:
            ct.append_reviews(self.data, rows)
        # (no file name in the answer: a server's paths are nobody's business on the page)
        return {"written": len(rows), "decision": decision, "target": target}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _whole(value, refusal: str) -> int:
    """An id sent as a JSON integer (or its digits as a string); a float, a bool, an infinite
    or a fractional number is refused with ``refusal`` rather than truncated to another id."""
    if isinstance(value, bool):
        raise ValueError(refusal)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            return int(value)
        except ValueError:  # more digits than Python converts
            raise ValueError(refusal) from None
    raise ValueError(refusal)


def create_review_router(data: str, token: str) -> APIRouter:
    queue = ReviewQueue(data)
    router = APIRouter()

    @router.get("/review", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "review.html", media_type="text/html")

    @router.get("/review/api/groups")
    async def groups(offset: int = 0, limit: int = 50):
        return queue.listing(max(0, offset), max(1, min(limit, 500)))

    @router.get("/review/api/categories")
    async def categories():
        return {"categories": queue.categories}

    @router.get("/review/picture/{product_id}/{img_idx}")
    async def picture(product_id: int, img_idx: int):
        raw = queue.pictures.get((product_id, img_idx))
        if raw is None:
            return JSONResponse({"detail": f"picture {product_id}/{img_idx} is not in the "
                                           f"review queue"}, status_code=404)
        return Response(raw, media_type="image/jpeg")

    @router.post("/review/api/decisions")
    async def decisions(request: Request):
        refused = guard.write_refusal(request.headers, token, str(request.url))
        if refused:
            return JSONResponse({"detail": refused[1]}, status_code=refused[0])
        try:
            body = json.loads(await request.body(), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"detail": "body is not JSON (NaN and Infinity are not "
                                           "JSON either)"}, status_code=422)
        except RecursionError:
            return JSONResponse({"detail": "body is JSON nested too deep: expected one "
                                           "object of a decision"}, status_code=422)
        if not isinstance(body, dict):
            return JSONResponse({"detail": "expected a JSON object"}, status_code=422)
        try:
            return queue.decide(body)
        except LookupError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)

    return router


def review_limits(scfg: Serve) -> dict:
    """The review API's own body limit, for :class:`hierarchy.serve.guard.BodyLimit`."""
    return {"/review/": (scfg.review_max_body_bytes, "serve.review_max_body_bytes")}


def review_link(data: str, host: str, port: int, token: str) -> str:
    return f"review page of {data} on http://{host}:{port}/review#token={token}"


def review_server(cfg: Settings, data: str, host=None, port=None,
                  allow_remote: bool = False) -> int:
    import uvicorn

    scfg = cfg.serve
    host, port = host or scfg.host, int(port if port is not None else scfg.port)
    guard.check_host(host, allow_remote, "the review page")
    token = guard.new_token()
    app = FastAPI(title="hierarchy review", version="1")
    app.include_router(create_review_router(data, token))

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    print(review_link(data, host, port, token), flush=True)
    app = guard.BodyLimit(app, scfg.max_body_bytes, review_limits(scfg),
                          timeout=scfg.body_timeout_s)
    uvicorn.run(guard.local_hosts_only(app, host, allow_remote), host=host, port=port,
                log_level="warning", access_log=False, **guard.server_limits(scfg))
    return 0
