"""``kdedge serve``: a real server on a loopback port chosen by the OS (uvicorn on a thread, or the
CLI in a subprocess), real HTTP clients (``http.client``), concurrent requests, bad input,
shutdown with requests in flight. No assertion depends on timing: deadlines are generous and
the planned costs are given, not measured (except in the CLI test, which profiles the toy)."""

from __future__ import annotations

import gc
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("orjson")

from helpers_runtime import GREY, RGB, png16, toy_bundle  # noqa: E402
from kdedge.runtime import Fixed, Runner  # noqa: E402
from kdedge.runtime.scheduler import Costs, Scheduler  # noqa: E402
from kdedge.serve import BackgroundServer, create_app, decode_body  # noqa: E402
from kdedge.serve.decode import BodyError  # noqa: E402

GRAPHS = ["stage0", "stage1", "stage2", "prefix0", "prefix1", "prefix2"]


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(url: str, body: bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    status, hdrs, data = request(url, "POST", body, {k.replace("_", "-"): v for k, v in headers.items()})
    assert hdrs["content-type"].startswith("application/json")
    return status, json.loads(data)


def png(a: np.ndarray, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def digit_images(n: int) -> np.ndarray:
    """Raw 8x8 digits as uint8 0..16, the toy bundle's raw input (scale 1/16)."""
    from sklearn.datasets import load_digits

    return load_digits().images[:n].astype(np.uint8)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return toy_bundle(tmp_path_factory.mktemp("bundles"))[0]


@pytest.fixture(scope="module")
def served(toy):
    """A server over the toy bundle on onnxruntime: anytime, batches up to 8, long deadlines."""
    runner = Runner(toy, threads=1)
    sched = Scheduler(runner, deadline_ms=30_000, max_batch=8, costs=Costs.from_function(lambda g, n: 0.05, GRAPHS, 8))
    assert sched.wait_ready(60)
    app = create_app(runner, sched, max_body=64 << 10)
    with BackgroundServer(app) as srv:
        yield srv.url, runner, sched, app
    sched.close()
    runner.close()


def reference(runner: Runner, x: np.ndarray, stage: int) -> np.ndarray:
    return runner.run(x, Fixed(stage + 1, fused=False)).probs[0]


def test_classify_an_image_and_npy_arrays(served) -> None:
    url, runner, _, _ = served
    raw = digit_images(3)
    bodies = [png(raw[0]), npy(raw[1]), npy(decode_body(png(raw[2]), runner.bundle))]
    for body, img in zip(bodies, raw):
        status, d = post(url + "/v1/classify?top_k=3", body, X_Deadline_Ms="20000")
        assert status == 200, d
        assert d["status"] == "ok" and d["stage"] == 2 and d["members"] == 4 and d["budget_met"] is True
        assert set(d) >= {"label", "class", "confidence", "top_k", "stage", "members", "queue_ms", "compute_ms",
                          "total_ms", "budget_met", "deadline_ms", "batch"}
        assert d["deadline_ms"] == 20000 and d["total_ms"] >= d["compute_ms"] >= 0 and d["queue_ms"] >= 0
        x = decode_body(png(img), runner.bundle)
        ref = reference(runner, x, d["stage"])
        assert d["label"] == int(ref.argmax()) and d["class"] == runner.classes[d["label"]]
        assert [t["label"] for t in d["top_k"]] == list(np.argsort(-ref, kind="stable")[:3])
        assert d["top_k"][0]["p"] == pytest.approx(d["confidence"]) == pytest.approx(float(ref.max()), abs=1e-5)
    # the deadline as a query parameter, and the server's default when none is given
    assert post(url + "/v1/classify?deadline_ms=15000", bodies[0])[1]["deadline_ms"] == 15000
    assert post(url + "/v1/classify", bodies[0])[1]["deadline_ms"] == 30000


def test_a_body_sent_in_chunks_is_read_whole_and_a_chunked_one_too_large_is_refused(served) -> None:
    import http.client

    url, runner, _, _ = served
    u = urlsplit(url)
    body = png(digit_images(1)[0])
    want = post(url + "/v1/classify", body)[1]
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        parts = [body[i:i + 7] for i in range(0, len(body), 7)]  # chunked transfer encoding: one ASGI message each
        conn.request("POST", "/v1/classify", body=iter(parts), encode_chunked=True)
        r = conn.getresponse()
        d = json.loads(r.read())
        assert r.status == 200 and r.getheader("content-type") == "application/json", d
        assert (d["label"], d["stage"]) == (want["label"], want["stage"])
        assert d["confidence"] == pytest.approx(want["confidence"])
        big = [b"\x00" * 4096] * 17  # 68 KiB > the fixture's 64 KiB, with no Content-Length to refuse it by
        conn.request("POST", "/v1/classify", body=iter(big), encode_chunked=True)
        r = conn.getresponse()
        d = json.loads(r.read())
        assert r.status == 413 and d["status"] == "bad_request" and "larger than the 65,536 bytes" in d["error"]
    finally:
        conn.close()
    assert post(url + "/v1/classify", body)[1]["label"] == want["label"]  # and it keeps serving


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served) -> None:
    url, runner, sched, _ = served
    raw = digit_images(48)
    before = sched.stats()
    got: dict[int, tuple[int, dict[str, Any]]] = {}

    def client(idx: range) -> None:
        for i in idx:
            got[i] = post(url + "/v1/classify", png(raw[i]))

    threads = [threading.Thread(target=client, args=(range(k, 48, 8),)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(48))
    for i, (status, d) in got.items():
        assert status == 200, d
        ref = reference(runner, decode_body(png(raw[i]), runner.bundle), d["stage"])
        assert d["label"] == int(ref.argmax()), i
        assert d["confidence"] == pytest.approx(float(ref.max()), abs=1e-5)
    after = sched.stats()
    assert after["ok"] - before["ok"] == 48 and after["queue"] == 0


def _raw_npy(header: str, data: bytes) -> bytes:
    """A .npy of format 1.0 with any header numpy.save would not write (e.g. negative dimensions)."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


BAD = [
    # (name, body, headers, query, status, words in the error)
    ("empty body", b"", {}, "", 400, "empty"),
    ("not an image", b"hello, world" * 10, {}, "", 400, "neither an image"),
    ("truncated png", None, {}, "", 400, "cannot be decoded"),
    ("npy with a damaged header", b"\x93NUMPY\x01\x00\x10\x00{'descr': 'oops'   \n", {}, "", 400, "header"),
    ("truncated npy", None, {}, "", 400, "truncated"),
    ("npy of the wrong shape", npy(np.zeros((1, 1, 9, 9), np.float32)), {}, "", 422, "9x9"),
    ("npy of the wrong dtype", npy(np.zeros((8, 8), np.int64)), {}, "", 422, "dtype int64"),
    ("npy with NaN", npy(np.full((1, 1, 8, 8), np.nan, np.float32)), {}, "", 422, "NaN"),
    ("two samples", npy(np.zeros((2, 1, 8, 8), np.float32)), {}, "", 422, "one sample per request"),
    ("object npy", None, {}, "", 422, "object"),
    ("npy with negative dimensions", _raw_npy("{'descr': '|u1', 'fortran_order': False, 'shape': (-8, -8), }",
                                              bytes(64)), {}, "", 400, "negative dimension [-8, -8]"),
    ("npy with negative samples", _raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, -1, 8, 8), }",
                                           bytes(256)), {}, "", 400, "negative dimension"),
    ("colour image for a grey model", None, {}, "", 422, "colour"),
    ("image of the wrong size", None, {}, "", 422, "8x8"),
    ("oversized body", b"\x89PNG" + b"0" * (70 << 10), {}, "", 413, "larger than"),
    ("deadline not a number", None, {"X-Deadline-Ms": "soon"}, "", 400, "number of milliseconds"),
    ("negative deadline", None, {"X-Deadline-Ms": "-5"}, "", 400, "> 0"),
    ("NaN deadline", None, {}, "deadline_ms=nan", 400, "> 0"),
    ("two different deadlines", None, {"X-Deadline-Ms": "5"}, "deadline_ms=6", 400, "given 2 times"),
    ("two different deadline queries", None, {}, "deadline_ms=1&deadline_ms=10", 400, "given 2 times"),
    ("empty deadline header", None, {"X-Deadline-Ms": ""}, "", 400, "got ''"),
    ("empty deadline query", None, {}, "deadline_ms=", 400, "got ''"),
    ("deadline with an underscore", None, {"X-Deadline-Ms": "1_0"}, "", 400, "got '1_0'"),
    ("deadline in hex", None, {"X-Deadline-Ms": "0x10"}, "", 400, "number of milliseconds"),
    ("top_k out of range", None, {}, "top_k=11", 400, "top_k"),
    ("top_k with an underscore", None, {}, "top_k=1_0", 400, "top_k"),
    ("two different top_k", None, {}, "top_k=1&top_k=2", 400, "given 2 times"),
    ("top_k of 5000 digits", None, {}, "top_k=" + "9" * 5000, 400, "top_k must be an integer from 1 to 10"),
]


@pytest.mark.parametrize("headers, query, want", [
    ([(b"x-deadline-ms", b"10"), (b"x-deadline-ms", b"20")], b"", "given 2 times"),
    ([(b"X-Deadline-Ms", b" 10 ")], b"deadline_ms=10&deadline_ms=10", 10.0),  # the same value, three times
    ([], b"deadline_ms=2.5e1", 25.0),
    ([], b"deadline_ms=.5", 0.5),
    ([], b"", None),
])
def test_the_deadline_is_one_number_however_often_it_is_given(headers, query, want) -> None:
    from kdedge.serve.app import _Call, _deadline

    req = _Call({"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers,
                 "query_string": query})
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            _deadline(req)
    else:
        assert _deadline(req) == want




def _has_opencv() -> bool:
    import importlib.util

    return importlib.util.find_spec("cv2") is not None


DECODERS = ["pillow", pytest.param("opencv", marks=pytest.mark.skipif(
    not _has_opencv(), reason="OpenCV is not installed (the opencv extra); PNG bodies are decoded by Pillow"))]


@pytest.fixture(params=DECODERS)
def decoder(request, monkeypatch) -> str:
    """Bodies decoded by Pillow alone, or with OpenCV for 8-bit PNG (the server's choice when it
    is installed)."""
    import kdedge.serve.decode as decode_mod

    monkeypatch.setattr(decode_mod, "_OPENCV", {})
    monkeypatch.setenv("KDEDGE_OPENCV", "1" if request.param == "opencv" else "0")
    assert (decode_mod.opencv() is not None) == (request.param == "opencv")
    return request.param


def _spec(manifest: dict[str, Any]) -> Any:
    from types import SimpleNamespace

    from kdedge.bundle.inputs import InputSpec

    return SimpleNamespace(input_shape=tuple(manifest["input"]["shape"]), preprocessing=manifest["preprocessing"],
                           input_info=InputSpec.from_manifest(manifest))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"])
def test_a_body_decodes_as_the_same_file_does(tmp_path: Path, fmt: str, decoder: str) -> None:
    from PIL import Image

    from kdedge.runtime import InputError, load_inputs

    rng = np.random.default_rng(0)
    grey = (rng.random((8, 8)) * 16).astype(np.uint8)
    colour = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    pictures = {  # (model, picture) for every mode a format can hold
        "L": (GREY, Image.fromarray(grey, "L")),
        "grey as RGB": (GREY, Image.fromarray(np.repeat(grey[:, :, None], 3, 2), "RGB")),
        "LA": (GREY, Image.fromarray(np.stack([grey, grey], 2), "LA")),
        "1": (GREY, Image.fromarray(grey > 7).convert("1")),
        "RGB": (RGB, Image.fromarray(colour, "RGB")),
        "RGBA": (RGB, Image.fromarray(np.concatenate([colour, colour[:, :, :1]], 2), "RGBA")),
        "P": (RGB, Image.fromarray(colour, "RGB").quantize(16)),
        "L for RGB": (RGB, Image.fromarray(colour[:, :, 0], "L")),
        "LA for RGB": (RGB, Image.fromarray(colour[:, :, :2], "LA")),
        "colour for grey": (GREY, Image.fromarray(colour[:8, :8], "RGB")),  # refused by both
    }
    checked = 0
    for name, (manifest, picture) in pictures.items():
        path = tmp_path / f"{name}.{fmt.lower()}"
        try:
            picture.save(path, format=fmt)
        except (OSError, ValueError, KeyError):  # a mode the format cannot hold
            continue
        bundle = _spec(manifest)
        try:
            want = load_inputs(path, manifest).x
        except InputError:  # e.g. a lossy format's grey picture stored as RGB is no longer grey: both refuse it
            with pytest.raises(BodyError):
                decode_body(path.read_bytes(), bundle)
            continue
        got = decode_body(path.read_bytes(), bundle)
        np.testing.assert_array_equal(got, want, err_msg=f"{fmt} {name}")
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (1, *bundle.input_shape[1:])
        checked += 1
    assert checked >= 3, f"{fmt}: only {checked} modes could be saved"


@pytest.mark.parametrize("fmt", ["WEBP", "JPEG"])
def test_a_grey_picture_in_a_lossy_colour_format_is_grey_for_a_grey_model(tmp_path: Path, fmt: str) -> None:
    """Lossy WebP has no grey mode: a grey picture comes back with its channels a step apart.
    Both the runner's files and the server's bodies take it, as Pillow's luma of it."""
    from PIL import Image

    from kdedge.runtime import InputError, load_inputs

    import copy

    spec = copy.deepcopy(GREY)  # the toy grey input at 28 x 28: at 8 x 8 WebP happens to keep it exact
    spec["input"]["shape"][2:] = spec["preprocessing"]["input_size"] = [28, 28]
    grey = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    path = tmp_path / f"g.{fmt.lower()}"
    Image.fromarray(np.repeat(grey[:, :, None], 3, 2), "RGB").save(path, format=fmt, quality=80)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
        luma = np.asarray(im.convert("L"))
    if fmt == "WEBP":
        assert (rgb.max(2) - rgb.min(2)).max() > 0  # the case: not exactly grey any more
    want = load_inputs(path, spec).x
    np.testing.assert_allclose(want, (luma[None, None] / 16 - 0.3) / 0.4, rtol=1e-6)  # the toy's scale, mean, std
    np.testing.assert_array_equal(decode_body(path.read_bytes(), _spec(spec)), want)
    tinted = np.repeat(grey[:, :, None], 3, 2)
    tinted[..., 0] = 255 - tinted[..., 0]  # clearly colour: still refused
    Image.fromarray(tinted, "RGB").save(path, format=fmt, quality=80)
    with pytest.raises(InputError, match="colour image"):
        load_inputs(path, spec)
    with pytest.raises(BodyError, match="in colour"):
        decode_body(path.read_bytes(), _spec(spec))


def test_png_gamma_colour_space_and_transparency_chunks_do_not_change_the_pixels(tmp_path: Path, decoder: str) -> None:
    """Neither decoder applies a PNG's gamma (gAMA), colour space (sRGB) or significant bits
    (sBIT), and a transparent colour (tRNS) is dropped like alpha: the pixels are the file's."""
    import struct

    from PIL import Image, PngImagePlugin

    from kdedge.runtime import load_inputs

    rng = np.random.default_rng(1)
    for manifest, mode, arr in ((GREY, "L", (rng.random((8, 8)) * 16).astype(np.uint8)),
                                (RGB, "RGB", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))):
        ch = 1 if mode == "L" else 3
        for chunk, data in ((b"gAMA", struct.pack(">I", 10000)), (b"sRGB", b"\x00"), (b"sBIT", b"\x03" * ch),
                            (b"tRNS", b"\x00\x05" * ch)):
            info = PngImagePlugin.PngInfo()
            info.add(chunk, data)
            path = tmp_path / f"{mode}-{chunk.decode()}.png"
            Image.fromarray(arr, mode).save(path, format="PNG", pnginfo=info)
            np.testing.assert_array_equal(decode_body(path.read_bytes(), _spec(manifest)),
                                          load_inputs(path, manifest).x, err_msg=f"{mode} {chunk!r}")


def test_a_damaged_or_outsized_png_gets_the_same_error_from_either_decoder(decoder: str) -> None:

    from PIL import Image

    grey = _spec(GREY)
    good = png(digit_images(1)[0])
    cases = [(good[: len(good) // 2], 400, "cannot be decoded"),
             (good[:40] + bytes(len(good) - 40), 400, "neither an image"),  # the chunks after IHDR zeroed
             (png(np.zeros((9, 12), np.uint8)), 422, "is 9x12 (height x width), the model expects 8x8"),
             ]
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(buf, format="PNG")
    cases.append((buf.getvalue(), 422, "16-bit greyscale PNG"))
    for mode, shape, kind in (("RGB", (8, 8, 3), "RGB"), ("LA", (8, 8, 2), "greyscale+alpha")):
        # Pillow would keep only the high bytes of each value: a black picture
        cases.append((png16(np.full(shape, 200, np.uint16), mode), 422, f"16-bit {kind} PNG"))
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    for side in (9000, 40000):  # an IHDR claiming 81 M pixels (below Pillow's bound), then 1.6 G (above it)
        bomb = bytearray(buf.getvalue())
        bomb[16:24] = side.to_bytes(4, "big") * 2
        bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
        cases.append((bytes(bomb), 422, "more than the 64 Mi pixels"))
    for body, status, words in cases:
        with pytest.raises(BodyError) as info:
            decode_body(body, grey)
        assert info.value.status == status and words in str(info.value), (decoder, str(info.value))


def _bad_body(name: str, body: bytes | None) -> bytes:
    good = png(digit_images(1)[0])
    if body is not None:
        return body
    if name == "truncated png":
        return good[: len(good) // 2]
    if name == "truncated npy":
        return npy(np.zeros((1, 1, 8, 8), np.float32))[:-7]
    if name == "object npy":
        return npy(np.array([None, 1], dtype=object))
    if name == "colour image for a grey model":
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[..., 0] = 200
        return png(rgb, "RGB")
    if name == "image of the wrong size":
        return png(np.zeros((9, 12), np.uint8))
    return good


@pytest.mark.parametrize("name, body, headers, query, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_one_clear_4xx_line_and_the_server_keeps_serving(served, name, body, headers, query, status,
                                                                        words) -> None:
    url, runner, _, _ = served
    code, hdrs, data = request(url + "/v1/classify" + (f"?{query}" if query else ""), "POST", _bad_body(name, body),
                               headers)
    assert code == status, data
    d = json.loads(data)
    assert d["status"] == "bad_request" and words in d["error"], d
    assert "\n" not in d["error"] and "Traceback" not in d["error"]
    ok, answer = post(url + "/v1/classify", png(digit_images(1)[0]))
    assert ok == 200 and answer["status"] == "ok"


def test_wrong_methods_and_paths_are_json_errors(served) -> None:
    url = served[0]
    code, _, data = request(url + "/v1/classify")
    assert code == 405 and "not allowed" in json.loads(data)["error"]
    code, _, data = request(url + "/v2/predict", "POST", b"x")
    assert code == 404 and "/v1/classify" in json.loads(data)["error"]


def test_responses_are_strict_json() -> None:
    from kdedge.serve.app import _json

    r = _json({"x": float("nan"), "y": float("-inf"), "p": np.float32(0.5), "a": np.array([np.nan, 1.0]),
               "n": np.int64(3)})
    assert r.media_type == "application/json"
    assert json.loads(r.body, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {
        "x": None, "y": None, "p": 0.5, "a": [None, 1.0], "n": 3}


def test_health_model_and_metrics(served) -> None:
    url, runner, sched, _ = served
    code, _, data = request(url + "/v1/health")
    assert code == 200 and json.loads(data)["status"] == "ready"
    code, _, data = request(url + "/v1/model")
    m = json.loads(data)
    assert code == 200 and m["family"] == runner.bundle.family and [s["name"] for s in m["stages"]] == [
        "stage0", "stage1", "stage2"]
    assert m["input_shape"] == [None, 1, 8, 8] and m["num_classes"] == 10 and m["scheduler"]["mode"] == "anytime"
    assert m["scheduler"]["max_batch"] == 8 and m["scheduler"]["deadline_ms"] == 30000
    assert m["png_decoder"] == ("opencv" if _has_opencv() and os.environ.get("KDEDGE_OPENCV", "1") != "0" else "pillow")
    post(url + "/v1/classify", png(digit_images(1)[0]))
    request(url + "/v1/classify", "POST", b"")
    code, hdrs, data = request(url + "/metrics")
    text = data.decode()
    assert code == 200 and hdrs["content-type"].startswith("text/plain")

    def value(series: str) -> float:
        m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
        assert m, series
        return float(m.group(1))

    s = sched.stats()
    assert value('kdedge_requests_total{status="ok"}') == s["ok"] >= 1
    assert value('kdedge_requests_total{status="bad_request"}') >= 1
    assert sum(value(f'kdedge_answers_total{{stage="{k}"}}') for k in range(3)) == s["ok"]
    assert value("kdedge_queue_length") == 0 and value("kdedge_shed_total") == 0
    assert value("kdedge_deadline_misses_total") == s["misses"]
    assert value("kdedge_request_seconds_count") == s["ok"] and 'kdedge_batch_size_bucket{le="8.0"}' in text
    assert value("kdedge_gc_frozen_objects") == gc.get_freeze_count()  # the process's, read when scraped

    # the collector's pauses, counted while the app runs (its lifespan installed the callback)
    before = value('kdedge_gc_pause_seconds_count{generation="2"}')
    gc.collect()
    text = request(url + "/metrics")[2].decode()
    assert value('kdedge_gc_pause_seconds_count{generation="2"}') >= before + 1
    assert value('kdedge_gc_pause_seconds_sum{generation="2"}') > 0
    buckets = [float(v) for v in re.findall(r'^kdedge_gc_pause_seconds_bucket\{generation="2",le="[^"]+"\} (\S+)$',
                                            text, re.M)]
    assert len(buckets) == 10 and buckets == sorted(buckets)
    assert buckets[-1] == value('kdedge_gc_pause_seconds_count{generation="2"}')


def test_gc_pauses_count_only_while_installed() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from kdedge.serve.metrics import GcPauses

    r = CollectorRegistry()
    g = GcPauses()
    r.register(g)

    def count() -> float:
        m = re.search(r'^kdedge_gc_pause_seconds_count\{generation="1"\} (\S+)$', generate_latest(r).decode(), re.M)
        assert m
        return float(m.group(1))

    gc.collect(1)
    assert count() == 0
    g.install()
    g.install()  # once only
    assert gc.callbacks.count(g._callback) == 1
    gc.collect(1)
    n = count()
    assert n >= 1  # this one, and any the allocations in between triggered
    g.remove()
    gc.collect(1)
    assert count() == n and g._callback not in gc.callbacks


def test_not_ready_until_warmed_up(toy) -> None:
    with Runner(toy, threads=1) as runner:
        sched = Scheduler(runner, deadline_ms=1000, costs=Costs.from_function(lambda g, n: 0.05, GRAPHS, 32),
                          start=False)  # warm-up never runs: never ready
        with BackgroundServer(create_app(runner, sched)) as srv:
            code, _, data = request(srv.url + "/v1/health")
            assert code == 503 and json.loads(data)["status"] == "starting"
            code, hdrs, data = request(srv.url + "/v1/classify", "POST", png(digit_images(1)[0]))
            assert code == 503 and json.loads(data)["status"] == "starting" and hdrs["retry-after"] == "1"
        assert sched.queue_length == 0


def test_what_cannot_get_stage_0_in_time_is_shed_at_once_with_a_clear_status(toy) -> None:
    with Runner(toy, threads=1) as runner:
        # planned at 50 ms a stage: a 20 ms deadline cannot get even stage 0
        sched = Scheduler(runner, costs=Costs.from_function(lambda g, n: 50.0, GRAPHS, 32))
        assert sched.wait_ready(60)
        app = create_app(runner, sched)
        with BackgroundServer(app) as srv:
            code, hdrs, data = request(srv.url + "/v1/classify", "POST", png(digit_images(1)[0]),
                                       {"X-Deadline-Ms": "20"})
            d = json.loads(data)
            assert code == 503 and d["status"] == "shed" and "deadline cannot be met" in d["error"]
            assert hdrs["retry-after"] == "1" and d["budget_met"] is False
            code, _, data = request(srv.url + "/v1/classify", "POST", png(digit_images(1)[0]),
                                    {"X-Deadline-Ms": "500"})
            assert code == 200 and json.loads(data)["stage"] == 2
            text = request(srv.url + "/metrics")[2].decode()
            assert "kdedge_shed_total 1.0" in text and 'kdedge_requests_total{status="shed"} 1.0' in text
        sched.close()
        assert sched.stats()["shed"] == 1 and sched.stats()["ok"] == 1


class SlowSession:
    """A stage session that sleeps ``ms`` (wall clock) and returns zeros: requests stay in flight."""

    can_abort = False
    can_bind = False

    def __init__(self, entry: Any, ms: float) -> None:
        self.entry, self.ms = entry, ms

    def run(self, inputs: Any, abort: Any = None) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        time.sleep(self.ms / 1e3)
        return {o.tensor: np.zeros((n, *o.shape[1:]), np.float32) for o in self.entry.outputs}

    def close(self) -> None:
        pass


def test_shutdown_answers_every_request_in_flight(toy) -> None:
    runner = Runner(toy, session_factory=lambda b, e, o: SlowSession(e, 20.0), watchdog=False)
    sched = Scheduler(runner, max_batch=4, costs=Costs.from_function(lambda g, n: 20.0, GRAPHS, 4), warmup=False)
    srv = BackgroundServer(create_app(runner, sched)).start()
    body = png(digit_images(1)[0])
    got: list[Any] = []

    def client() -> None:
        try:
            got.append(post(srv.url + "/v1/classify", body))
        except Exception as e:  # recorded: the assertion below says what happened
            got.append(e)

    clients = [threading.Thread(target=client) for _ in range(12)]
    for t in clients:
        t.start()
    end = time.monotonic() + 30
    while sched.in_flight < 12 and time.monotonic() < end:  # every request accepted, most still queued
        time.sleep(0.002)
    assert sched.in_flight == 12 and sched.stats()["ok"] < 12
    srv.stop()  # as on SIGTERM: stop accepting, answer what is in flight
    for t in clients:
        t.join(60)
    assert len(got) == 12 and all(not isinstance(g, Exception) and g[0] == 200 for g in got), got
    assert sched.closing and sched.stats()["ok"] == 12
    with pytest.raises(OSError):
        request(srv.url + "/v1/health", timeout=5)
    runner.close()


# ---------------------------------------------------------------------------------------------
# the command


def _kdedge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdedge.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def _ready(proc: subprocess.Popen) -> tuple[str, str]:
    """The URL a ``kdedge serve`` subprocess announced, once its health check answers 200 (and
    its first stderr line)."""
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert m, line + (proc.stderr.read() if proc.poll() is not None else "")
    url = f"http://127.0.0.1:{m.group(1)}"
    end = time.monotonic() + 60
    while True:
        try:
            if request(url + "/v1/health", timeout=5)[0] == 200:
                return url, line
        except OSError:
            pass
        assert time.monotonic() < end and proc.poll() is None, "the server did not become ready"
        time.sleep(0.05)


def _frozen_objects(url: str) -> float:
    m = re.search(r"^kdedge_gc_frozen_objects (\S+)$", request(url + "/metrics")[2].decode(), re.M)
    assert m
    return float(m.group(1))


def _interrupt(proc: subprocess.Popen) -> str:
    """Stop a ``kdedge serve`` subprocess with SIGINT as a user's Ctrl-C would (killed if it does
    not end within a minute); its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_profiles_planning_and_stops_cleanly_on_sigint(toy, tmp_path: Path) -> None:
    bundle = tmp_path / "toy.kdedge"
    shutil.copytree(toy, bundle)
    res = _kdedge("serve", str(bundle), "--port", "0", "--deadline-ms", "100")
    assert res.returncode == 2 and "kdedge profile" in res.stderr and "Traceback" not in res.stderr
    res = _kdedge("profile", str(bundle), "--batch", "1,4", "--runs", "20", "--warmup", "5", "--threads", "1")
    assert res.returncode == 0, res.stderr
    proc = subprocess.Popen([sys.executable, "-m", "kdedge.cli.main", "serve", str(bundle), "--port", "0",
                             "--deadline-ms", "2000", "--max-batch", "4", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        url, line = _ready(proc)
        assert "batches up to 4" in line and "anytime" in line
        status, d = post(url + "/v1/classify", png(digit_images(1)[0]))
        assert status == 200 and d["status"] == "ok" and d["deadline_ms"] == 2000
        # after the warm-up the server moved its start-up objects into the permanent generation
        assert _frozen_objects(url) > 10_000
    finally:
        err = _interrupt(proc)
    assert proc.returncode == 0, err
    assert "stopped: 1 answered" in err and "Traceback" not in err


def test_cli_serve_no_gc_freeze_leaves_the_collector_alone(toy) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kdedge.cli.main", "serve", str(toy), "--port", "0",
                             "--stages", "2", "--no-gc-freeze", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, _ = _ready(proc)
        assert _frozen_objects(url) == 0
    finally:
        err = _interrupt(proc)
    assert proc.returncode == 0, err


def test_cli_serve_refuses_bad_arguments_with_one_line(toy, tmp_path: Path) -> None:
    import socket

    res = _kdedge("serve", str(tmp_path / "missing.kdedge"), "--port", "0")
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
    res = _kdedge("serve", str(toy), "--port", "70000")
    assert res.returncode == 2 and "--port" in res.stderr
    res = _kdedge("serve", str(toy), "--stages", "2", "--max-batch", "0", "--port", "0")
    assert res.returncode == 2 and "max_batch" in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = _kdedge("serve", str(toy), "--stages", "2", "--port", str(busy.getsockname()[1]))
    assert res.returncode == 2 and "cannot listen" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_beyond_the_concurrency_limit_a_classify_request_is_refused_as_json_and_counted() -> None:
    import asyncio

    from kdedge.serve.app import _Limit

    counted: list[str] = []
    gate = asyncio.Event()

    async def app(scope, receive, send) -> None:  # a request that stays in progress until the gate opens
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def scope(path: str) -> dict[str, Any]:
        return {"type": "http", "method": "POST" if path == "/v1/classify" else "GET", "path": path}

    async def call(lim: _Limit, path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        await lim(scope(path), None, send)
        return sent

    async def main() -> None:
        lim = _Limit(app, 1, SimpleNamespace(count=counted.append))
        first = asyncio.ensure_future(call(lim, "/v1/classify"))
        await asyncio.sleep(0)
        assert lim.active == 1
        refused = await call(lim, "/v1/classify")  # answered at once, while the first is in progress
        start, body = refused
        assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
        d = json.loads(body["body"])
        assert d["status"] == "overloaded" and "--limit-concurrency" in d["error"] and "\n" not in d["error"]
        assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()
        other = asyncio.ensure_future(call(lim, "/metrics"))  # other endpoints are not limited
        gate.set()
        assert (await first)[0]["status"] == 200 and (await other)[0]["status"] == 200
        assert lim.active == 0 and (await call(lim, "/v1/classify"))[0]["status"] == 200

    asyncio.run(main())
    assert counted == ["overloaded"]


def test_the_limit_is_part_of_the_app_only_when_asked(served) -> None:
    from kdedge.serve.app import _Limit

    _, runner, sched, app = served
    assert not isinstance(app, _Limit)
    limited = create_app(runner, sched, limit_concurrency=3)
    assert isinstance(limited, _Limit) and limited.limit == 3
    assert limited.state.metrics is not app.state.metrics


def test_a_client_that_leaves_mid_body_is_counted_not_logged_as_an_error(toy) -> None:
    import socket

    runner = Runner(toy, threads=1)
    sched = Scheduler(runner, deadline_ms=30_000, costs=Costs.from_function(lambda g, n: 0.05, GRAPHS, 32))
    notes: list[str] = []
    try:
        assert sched.wait_ready(60)
        app = create_app(runner, sched, log=notes.append)
        with BackgroundServer(app) as srv:
            u = urlsplit(srv.url)
            with socket.create_connection((u.hostname, u.port), timeout=30) as s:
                s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\x89PNG" * 25)

            def left() -> bool:
                text = request(srv.url + "/metrics")[2].decode()
                return re.search(r'^kdedge_requests_total\{status="disconnected"\} 1\.0$', text, re.M) is not None

            for _ in range(200):  # the server notices the closed connection on its own time
                if left():
                    break
                time.sleep(0.05)
            assert left()
            assert post(srv.url + "/v1/classify", png(digit_images(1)[0]))[0] == 200
        assert notes == []
    finally:
        sched.close()
        runner.close()


def test_an_unexpected_error_in_classify_is_a_one_line_json_500_and_the_server_keeps_serving(
        toy, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdedge.runtime.tickets as tickets_mod
    import kdedge.serve.app as app_mod

    runner = Runner(toy, threads=1)
    sched = Scheduler(runner, deadline_ms=30_000, costs=Costs.from_function(lambda g, n: 0.05, GRAPHS, 32))
    notes: list[str] = []
    body = png(digit_images(1)[0])
    try:
        assert sched.wait_ready(60)
        with BackgroundServer(create_app(runner, sched, log=notes.append)) as srv:
            decode = app_mod.decode_body

            def broken_decode(*a: Any) -> Any:
                raise RuntimeError("decoder state lost\nsecond line")

            monkeypatch.setattr(app_mod, "decode_body", broken_decode)
            status, d = post(srv.url + "/v1/classify", body)
            assert status == 500 and d == {"status": "error", "error": "internal error (RuntimeError: decoder state lost)"}
            monkeypatch.setattr(app_mod, "decode_body", decode)

            def broken_top_k(self: Any, k: int, classes: Any) -> Any:  # after the model ran, as the answer is made
                raise KeyError("top")

            monkeypatch.setattr(tickets_mod.Answer, "top_k", broken_top_k)
            status, d = post(srv.url + "/v1/classify", body)
            assert status == 500 and d["error"] == "internal error (KeyError: 'top')"
            monkeypatch.undo()
            assert post(srv.url + "/v1/classify", body)[0] == 200
            text = request(srv.url + "/metrics")[2].decode()
            assert re.search(r'^kdedge_requests_total\{status="internal_error"\} 2\.0$', text, re.M)
        assert notes == ["POST /v1/classify: internal error (RuntimeError: decoder state lost)",
                         "POST /v1/classify: internal error (KeyError: 'top')"]
    finally:
        sched.close()
        runner.close()


def test_a_body_still_arriving_when_the_drain_timeout_ends_gets_a_json_503(toy) -> None:
    import socket

    runner = Runner(toy, threads=1)
    sched = Scheduler(runner, deadline_ms=30_000, costs=Costs.from_function(lambda g, n: 0.05, GRAPHS, 32))
    notes: list[str] = []
    try:
        assert sched.wait_ready(60)
        app = create_app(runner, sched, log=notes.append)
        srv = BackgroundServer(app, graceful_s=0.3).start()
        u = urlsplit(srv.url)
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\x89PNG" * 25)
            time.sleep(0.2)  # the handler is reading the body
            srv.stop()       # uvicorn cancels it once the drain timeout has passed
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply
        d = json.loads(body)
        assert d["status"] == "closed" and "--drain-timeout" in d["error"]
        assert notes == []
    finally:
        sched.close()
        runner.close()
