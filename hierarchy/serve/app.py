"""``hierarchy serve``: the run's classifier over HTTP (FastAPI on uvicorn).

    POST /v1/classify   one product as multipart (1..serve.max_pictures JPEG files, field
                        ``files``), or a JSON batch {"products": [{"id": ..., "pictures":
                        [base64 JPEG, ...]}, ...]}
    GET  /v1/model      run id, strategy, taxonomy fingerprint, backbone, image size
    GET  /health/live   the process answers
    GET  /health/ready  200 once every model is loaded, 503 before
    GET  /              a page to try it (static, from the package); OpenAPI at /docs

Bad input is a 4xx whose ``detail`` names the product, the picture and the limit, and the
server goes on: a body over ``serve.max_body_bytes`` (413, counted while it is read, whatever
Content-Length says), more pictures or products than allowed (413), a picture over
``serve.max_picture_bytes`` (413), a file that is not a JPEG (415: sniffed from its first
bytes, the content type is not trusted), a JPEG that does not decode, an empty product, bad
base64 or JSON (422), another content type (415).

In a JSON batch a bad product costs only itself: its place in ``products`` holds
``{"id", "error": {"status", "detail"}}`` and the others are answered (200). Only a batch in
which no product can be answered is a 4xx: the first product's status, every product's error
in ``errors``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from hierarchy.contracts.settings import Serve, Settings
from hierarchy.serve.classifier import JPEG_MAGIC, Classifier, MicroBatcher, Product
from hierarchy.serve.guard import BodyLimit, BodyTooLarge

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


class BadInput(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# the body /v1/classify reads itself (one multipart product or a JSON batch), declared so
# that /docs can send both
_JPEGS = {"type": "array", "items": {"type": "string", "format": "binary"}}
CLASSIFY_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {**_JPEGS, "description": "the product's JPEGs "
                                                          "(1..serve.max_pictures)"},
                       "id": {"type": "string", "description": "echoed in the answer"}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["products"],
        "properties": {"products": {"type": "array", "description": "up to serve.max_products",
                                    "items": {"type": "object", "required": ["pictures"],
                                              "properties": {
                                                  "id": {"type": ["string", "integer"],
                                                         "description": "echoed as text; "
                                                         "by default its place"},
                                                  "pictures": {"type": "array", "items": {
                                                      "type": "string", "format": "byte",
                                                      "description": "a base64 JPEG"}}}}}}}}}}


BOMB = -1  # declared_pixels of a header Pillow refuses outright (over 2 x its MAX_IMAGE_PIXELS)


def declared_pixels(raw: bytes) -> Optional[int]:
    """Width x height a JPEG's header declares, read without decoding (None when Pillow
    cannot read the header: the decode then says the picture is broken). A 692-byte JPEG
    may declare 65500 x 65500 pixels: decoding it first would cost ~190 MB and seconds."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # Pillow's own refusal, before it tells the size
        return BOMB
    except Exception:  # noqa: BLE001 - any unreadable header is the decoder's to report
        return None
    return width * height


class Limits:
    """One request's limits: bytes and declared pixels per picture, pixels over the request
    (taken as pictures are accepted, so a JSON batch refuses the products past the budget
    and answers the others)."""

    def __init__(self, scfg: Serve):
        self.max_bytes = scfg.max_picture_bytes
        self.max_pixels = scfg.max_picture_pixels
        self.left = scfg.max_request_pixels

    def check(self, raw: bytes, where: str) -> bytes:
        if len(raw) > self.max_bytes:
            raise BadInput(413, f"{where} is {len(raw)} bytes; the limit is {self.max_bytes} "
                                f"(serve.max_picture_bytes)")
        if not raw.startswith(JPEG_MAGIC):
            raise BadInput(415, f"{where} is not a JPEG (it starts with "
                                f"{raw[:4].hex() or 'nothing'})")
        pixels = declared_pixels(raw)
        if pixels is not None and (pixels == BOMB or pixels > self.max_pixels):
            raise BadInput(413, f"{where} declares {_pixels_text(pixels)} pixels; ours is "
                                f"{self.max_pixels} (serve.max_picture_pixels)")
        if pixels is not None and pixels > self.left:
            raise BadInput(413, f"{where} would take the request over its decoded pixels "
                                f"(serve.max_request_pixels): send fewer or smaller pictures")
        self.left -= pixels or 0
        return raw


def _pixels_text(pixels: int) -> str:
    from PIL import Image

    return f"more than {2 * Image.MAX_IMAGE_PIXELS}" if pixels == BOMB else str(pixels)


def _json_pictures(pid: str, item, max_pics: int, limits: Limits) -> List[bytes]:
    """One JSON product's pictures as JPEG bytes, or the BadInput that names its problem."""
    pics = item.get("pictures") if isinstance(item, dict) else None
    if not isinstance(pics, list):
        raise BadInput(422, f"product {pid}: 'pictures' must be a list of base64 JPEGs")
    if len(pics) > max_pics:
        raise BadInput(413, f"product {pid} has {len(pics)} pictures; the limit is "
                            f"{max_pics} (serve.max_pictures)")
    raws = []
    for i, text in enumerate(pics):
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise BadInput(422, f"product {pid} picture {i}: not base64") from None
        raws.append(limits.check(raw, f"product {pid} picture {i}"))
    return raws


async def _multipart_products(request: Request, max_pics: int, limits: Limits) -> List[tuple]:
    form = await request.form(max_files=1000, max_fields=1000)
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if len(files) > max_pics:
        raise BadInput(413, f"product has more than {max_pics} pictures (serve.max_pictures)")
    raws = [await f.read() for f in files]
    pid = str(form.get("id") or "0")
    return [(pid, [limits.check(r, f"picture {i} ({files[i].filename})")
                   for i, r in enumerate(raws)])]


def _json_products(body: bytes, scfg: Serve, max_pics: int, limits: Limits) -> List[tuple]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(422, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadInput(422, 'body is JSON nested too deep: expected {"products": '
                            '[{"id": ..., "pictures": [base64 JPEG, ...]}, ...]}') from None
    items = doc.get("products") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise BadInput(422, 'expected {"products": [{"id": ..., "pictures": '
                            '[base64 JPEG, ...]}, ...]}')
    if len(items) > scfg.max_products:
        raise BadInput(413, f"{len(items)} products; the limit is "
                            f"{scfg.max_products} (serve.max_products)")
    out = []
    for n, item in enumerate(items):
        raw = item.get("id", n) if isinstance(item, dict) else n
        # an id is echoed back as the caller's key: an object or a list has no such text
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            out.append((str(n), BadInput(422, f"product {n}: 'id' must be a string or an "
                                              f"integer, not {type(raw).__name__}")))
            continue
        pid = str(raw)
        try:
            out.append((pid, _json_pictures(pid, item, max_pics, limits)))
        except BadInput as exc:
            out.append((pid, exc))
    if not out:
        raise BadInput(422, "no products in the request")
    return out


async def _request_products(request: Request, scfg: Serve) -> List[tuple]:
    """[(id, [jpeg bytes] or the product's BadInput)] of the request, checked for count,
    size and format. A request-wide problem raises; in a JSON batch a product's own problem
    is its entry (the others go on)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    max_pics, limits = scfg.max_pictures, Limits(scfg)
    if ctype == "multipart/form-data":
        return await _multipart_products(request, max_pics, limits)
    if ctype == "application/json":
        return _json_products(await request.body(), scfg, max_pics, limits)
    raise BadInput(415, f"content type {ctype or 'missing'}: send multipart/form-data "
                        f"(field 'files') or application/json")


async def _decoded(classifier: Classifier, items: List[tuple]):
    """(a result per product: its BadInput or None, the products to answer, their places):
    the pictures decoded off the event loop; a product with a picture that does not decode
    is refused, the others go on."""

    results: list = [raws if isinstance(raws, BadInput) else
                     BadInput(422, f"product {pid} has no pictures") if not raws else None
                     for pid, raws in items]
    todo = [n for n, r in enumerate(results) if r is None]
    decoded = await asyncio.to_thread(lambda: [classifier.decode(items[n][1]) for n in todo])
    products, placed = [], []
    for n, images in zip(todo, decoded):
        pid = items[n][0]
        bad = [i for i, im in enumerate(images) if im is None]
        if bad:
            results[n] = BadInput(422, f"product {pid} picture {bad[0]} is a JPEG that "
                                       f"does not decode")
        else:
            products.append(Product(pid, images))
            placed.append(n)
    return results, products, placed


def _refusal(pid: str, bad: BadInput) -> dict:
    return {"id": pid, "error": {"status": bad.status, "detail": bad.detail}}


async def _classify(request: Request, classifier: Classifier, scfg: Serve, batcher):
    """POST /v1/classify: every product of the request answered, or refused by name."""
    t0 = time.perf_counter()
    if not classifier.ready.is_set():
        detail = (f"the models failed to load: {classifier.error}" if classifier.error
                  else "the models are still loading (see /health/ready)")
        return JSONResponse({"detail": detail}, status_code=503)
    try:
        items = await _request_products(request, scfg)
    except BodyTooLarge:
        raise BadInput(413, f"request body over {scfg.max_body_bytes} bytes "
                            f"(serve.max_body_bytes)") from None
    results, products, placed = await _decoded(classifier, items)
    errors = [_refusal(items[n][0], r) for n, r in enumerate(results)
              if isinstance(r, BadInput)]
    if not products:  # nothing to answer: the request itself failed
        first = next(r for r in results if isinstance(r, BadInput))
        return JSONResponse({"detail": first.detail, "errors": errors},
                            status_code=first.status)
    if errors:
        log.info("classify: %d of %d products refused (first: %s)", len(errors),
                 len(items), errors[0]["error"]["detail"])
    answers, queued, model_s = await batcher.submit(products)
    for n, answer in zip(placed, answers):
        results[n] = answer
    return {"run_id": classifier.run_id, "strategy": classifier.strategy,
            "products": [_refusal(items[n][0], r) if isinstance(r, BadInput) else r
                         for n, r in enumerate(results)],
            "timing_ms": {"queue": round(queued * 1000, 2),
                          "model": round(model_s * 1000, 2),
                          "total": round((time.perf_counter() - t0) * 1000, 2)}}


def create_app(classifier: Classifier, scfg: Serve, data=None, token: str = ""):
    # (FastAPI reads the endpoints' annotations, Request included, from this module's names)
    batcher_box: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher = MicroBatcher(classifier, float(scfg.batch_window_ms),
                               scfg.max_batch_pictures)
        batcher.start()
        batcher_box["b"] = batcher
        # the server answers /health/live at once; ready when the models are in memory
        threading.Thread(target=classifier.load, name="load-models", daemon=True).start()
        yield
        await batcher.stop()

    app = FastAPI(title="hierarchy serve", version="1",
                  description="Product categories from a product's pictures, with the run's "
                              "models and predict's own combination.", lifespan=lifespan)

    if data:
        from hierarchy.serve.review import create_review_router

        app.include_router(create_review_router(data, token))

    @app.exception_handler(BadInput)
    async def bad_input(request, exc: BadInput):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if classifier.ready.is_set():
            return {"status": "ready"}
        return JSONResponse({"status": "failed" if classifier.error else "loading",
                             "detail": classifier.error}, status_code=503)

    @app.get("/v1/model")
    async def model():
        return classifier.describe()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/v1/classify", openapi_extra={"requestBody": CLASSIFY_BODY})
    async def classify(request: Request):
        return await _classify(request, classifier, scfg, batcher_box["b"])

    from hierarchy.serve.review import review_limits

    return BodyLimit(app, scfg.max_body_bytes, review_limits(scfg) if data else None,
                     timeout=scfg.body_timeout_s)


def serve(cfg: Settings, models: str, run_id: str, strategy=None, host=None, port=None,
          data=None, allow_remote: bool = False) -> int:
    """Check the run (refusals before the socket opens), then run uvicorn until stopped."""
    import uvicorn

    from hierarchy.serve import guard
    from hierarchy.serve.review import review_link

    scfg = cfg.serve
    host, port = host or scfg.host, int(port if port is not None else scfg.port)
    guard.check_host(host, allow_remote, "the classify API" + (" and the review page"
                                                                 if data else ""))
    classifier = Classifier(cfg, models, run_id, strategy)
    token = guard.new_token() if data else ""
    app = create_app(classifier, scfg, data, token)
    print(f"serving run {run_id} ({classifier.strategy}) on http://{host}:{port}/ "
          f"(API docs at /docs)", flush=True)
    if data:
        print(review_link(data, host, port, token), flush=True)
    uvicorn.run(guard.local_hosts_only(app, host, allow_remote), host=host, port=port,
                log_level="warning", access_log=False, **guard.server_limits(scfg))
    return 0
