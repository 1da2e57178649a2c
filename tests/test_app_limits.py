"""The web demo exposed (`--host 0.0.0.0`): one request can neither block the others nor exhaust the
server's memory or disk. Request handling in process, then the server over Gradio's HTTP API
(bounded loops on 127.0.0.1 only) with its resident memory read from /proc."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from odise_pl import app as app_module
from odise_pl.app import InputError, Segmenter, build_app
from odise_pl.inference.limits import InputLimits, LimitError
from odise_pl.model.clip import clip_text
from odise_pl.model.text_cache import TensorLRU
from test_app import _free_port

ROOT = Path(__file__).resolve().parents[1]


def huge_png(path: Path, width: int = 8000, height: int = 8000) -> Path:
    """A PNG whose header claims width x height pixels, in a few hundred bytes (one grey row, the
    rest never decoded if the size is checked first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = zlib.compress(b"\x00" + b"\x80" * width)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(p)
    return str(p)


@pytest.fixture()
def segmenter(tmp_path):
    return Segmenter({"random": None}, out_root=tmp_path / "requests", keep_requests=2)


# --- in process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab, option",
    [
        ("x" * 200_001, "--max-vocab-chars"),
        (";".join(f"c{i}" for i in range(5_001)), "--max-categories"),
        ("cat," + ",".join(f"n{i}" for i in range(40)), "--max-synonyms"),
        ("cat; " + " ".join(["word"] * 17), "--max-words"),
        ("cat; " + "a" * 65, "--max-word-chars"),
    ],
)
def test_each_vocabulary_limit_refuses_before_any_model_work(segmenter, image, vocab, option):
    start = time.monotonic()
    with pytest.raises(LimitError, match=f"over the limit .*{option}"):
        segmenter(image, vocab, [], "random")
    assert not segmenter._models  # refused before the model was even built
    assert time.monotonic() - start < 5


def test_an_oversized_image_is_refused_from_its_header(segmenter, tmp_path, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("decoded before the size was checked")

    monkeypatch.setattr(app_module, "load_image", no_decoding)
    big = huge_png(tmp_path / "big.png")
    assert big.stat().st_size < 50_000
    with pytest.raises(LimitError, match="8000x8000 = 64.0 MPixels, over the limit of 16.0"):
        segmenter(str(big), "cat", [], "random")


def test_unreadable_uploads_are_messages_without_server_paths(segmenter, image, tmp_path):
    jpeg = tmp_path / "cut.jpg"
    Image.open(image).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, message in ((jpeg, "could not be decoded"), (text, "is not an image this demo reads")):
        with pytest.raises(InputError) as err:
            segmenter(str(path), "cat", [], "random")
        assert message in str(err.value) and path.name in str(err.value)
        assert str(tmp_path) not in str(err.value) and "annotation" not in str(err.value)


def test_a_request_over_its_time_budget_is_refused(tmp_path, image):
    slow = Segmenter({"random": None}, limits=InputLimits(timeout_s=1e-6), out_root=tmp_path)
    with pytest.raises(LimitError, match="took longer than 1e-06 s .at encoding the vocabulary"):
        slow(image, "cat; dog; grass", [], "random")


def test_only_the_last_requests_stay_on_disk(segmenter, image):
    for _ in range(4):
        overlay, _, files = segmenter(image, "cat; grass", [], "random")
    folders = sorted(p.name for p in segmenter.out_root.iterdir())
    assert (
        folders == ["0000003", "0000004"]
        and Path(overlay).is_file()
        and all(Path(f).is_file() for f in files)
    )


def test_gradio_sweeps_its_cache(segmenter):
    assert build_app(segmenter).delete_cache == (60, 600)


def test_text_embeddings_are_encoded_in_chunks(tiny_clip):
    names = [[f"thing {i}", f"item {i}"] for i in range(300)]
    sizes = []
    real = tiny_clip.encode_text

    def spy(texts):
        sizes.append(len(texts))
        return real(texts)

    tiny_clip.encode_text = spy
    try:
        chunked, valid = tiny_clip.embed_vocabulary(names, "a photo of a {}.", chunk_size=64)
        assert max(sizes) == 64 and sum(sizes) == 600
        whole, valid2 = tiny_clip.embed_vocabulary(names, "a photo of a {}.", chunk_size=10_000)
    finally:
        del tiny_clip.encode_text
    assert torch.equal(valid, valid2)
    # the same sums in another batch order: float32 rounding, on the scale of the values
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5 * whole.abs().max().item())


def test_clip_sees_the_same_tokens_after_the_cut(tiny_clip):
    tok = tiny_clip.tokenizer
    rng = np.random.default_rng(0)
    long_text = " ".join(f"w{rng.integers(1000)}" for _ in range(150))
    assert clip_text("a photo of a cat.") == "a photo of a cat."
    assert torch.equal(tok([long_text]), tok([clip_text(long_text)]))  # 77 tokens either way
    start = time.monotonic()
    tiny_clip.encode_text(["x" * 40_000])  # a 40 KB "word": BPE sees 200 characters
    assert time.monotonic() - start < 5


def test_the_text_cache_is_bounded_by_bytes(tiny_odise):
    lru = TensorLRU(max_bytes=1000)
    a, b = torch.zeros(100), torch.zeros(100)  # 400 bytes each
    lru.put("a", (a,))
    lru.put("b", (b,))
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("c", (torch.zeros(100),))
    assert "b" not in lru and "a" in lru and "c" in lru and lru.nbytes == 800
    lru.put("huge", (torch.zeros(1000),))  # over the whole budget: not kept
    assert "huge" not in lru and lru.nbytes == 800
    net = tiny_odise
    net._vocab_cache = TensorLRU(max_bytes=64 * 1024)
    for v in range(30):  # 30 distinct vocabularies, each ~10 KB of embeddings
        net.text_embeddings([[f"v{v} c{i}"] for i in range(80)])
        assert net._vocab_cache.nbytes <= 64 * 1024
    assert 0 < len(net._vocab_cache) < 30


# --- over HTTP ------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1 with the tiny model; `--max-word-chars 0` so that a long word reaches
    the tokenizer (whose own cut must keep it fast); TMPDIR points its temporary folder here."""
    pytest.importorskip("gradio_client")
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    cmd = [sys.executable, "-m", "odise_pl.app", "--port", str(port), "--outputs", str(tmp / "none")]
    cmd += ["--max-pixels", "1000000", "--max-word-chars", "0", "--keep-requests", "3"]
    log = open(tmp / "app.log", "w+")
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    from gradio_client import Client

    deadline, client = time.time() + 180, None
    while client is None and time.time() < deadline:
        assert proc.poll() is None, (tmp / "app.log").read_text()[-3000:]
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp / "downloads"))
        except Exception:
            time.sleep(1)
    assert client is not None, "the app did not start"
    yield proc, client, tmp
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def ask(client, image, vocab: str) -> tuple[object, float]:
    """(result or the exception, seconds) of one request."""
    from gradio_client import handle_file

    start = time.monotonic()
    try:
        out = client.predict(handle_file(image), vocab, [], app_module.RANDOM, api_name="/segment")
    except Exception as err:
        out = err
    return out, time.monotonic() - start


def test_http_long_word_does_not_block_the_next_request(server, image):
    proc, client, _ = server
    ask(client, image, "cat")  # warm: the model is built on the first request
    results = {}

    def send(name, vocab):
        results[name] = ask(client, image, vocab)

    threads = [threading.Thread(target=send, args=("long", "x" * 40_000))]
    threads.append(threading.Thread(target=send, args=("valid", "cat; dog; grass")))
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for t in threads:
        t.join(timeout=120)
    long, valid = results["long"], results["valid"]
    assert long[1] < 20, long  # answered (tokenised after the cut), in seconds
    assert not isinstance(valid[0], Exception) and valid[1] < 30, valid
    refused, seconds = ask(client, image, "x" * 2_000_000)  # 2 MB: refused before parsing
    assert isinstance(refused, Exception) and "--max-vocab-chars" in str(refused) and seconds < 20


def test_http_huge_vocabularies_and_images_are_bounded_in_memory(server, image, tmp_path):
    proc, client, _ = server
    ask(client, image, "cat")
    before = rss_mb(proc.pid)
    many = ";".join(f"c{i}" for i in range(50_000))
    out, seconds = ask(client, image, many)
    assert isinstance(out, Exception) and "over the limit" in str(out) and seconds < 20
    out, _ = ask(client, image, ";".join(f"k{i}" for i in range(6_000)))
    assert isinstance(out, Exception) and "--max-categories" in str(out)
    big = huge_png(tmp_path / "big.png", 8000, 8000)
    out, _ = ask(client, str(big), "cat")
    assert isinstance(out, Exception) and "64.0 MPixels, over the limit of 1.0" in str(out)
    assert rss_mb(proc.pid) - before < 100  # decoding the image alone would take 64 MB+, 50k names GBs


def test_http_memory_is_flat_over_distinct_vocabularies(server, image):
    proc, client, _ = server
    rng = np.random.default_rng(0)

    def vocab():
        return ";".join(dict.fromkeys(f"w{rng.integers(10**9)}" for _ in range(400)))

    for _ in range(4):  # warm-up: allocator pools, first-use buffers
        ask(client, image, vocab())
    before = rss_mb(proc.pid)
    for _ in range(16):
        out, _ = ask(client, image, vocab())
        assert not isinstance(out, Exception), out
    assert rss_mb(proc.pid) - before < 64


def test_http_disk_is_bounded_and_cleaned_at_shutdown(server, image):
    proc, client, tmp = server
    for _ in range(5):
        ask(client, image, "cat; grass")
    roots = list(tmp.glob("odise_app_*"))
    assert len(roots) == 1
    requests = [p for p in (roots[0] / "requests").iterdir() if p.is_dir()]
    assert len(requests) <= 3
    assert (roots[0] / "gradio").is_dir()  # Gradio's uploads and cache: inside the app's folder
    text = (tmp / "app.log").read_text()
    assert "refused:" in text and "Traceback" not in text  # refusals are one line, no traceback
    proc.terminate()
    proc.wait(timeout=30)
    assert not roots[0].exists()
