import json

import numpy as np
import pytest
from PIL import Image

from odise_pl.data.io import rgb_to_ids
from odise_pl.demo import main


@pytest.fixture()
def image(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 120, 3), dtype=np.uint8)).save(p)
    return p


def test_demo_writes_overlay_panoptic_png_and_json(image, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "--image",
                str(image),
                "--vocab",
                "cat;dog,puppy;grass",
                "--dataset-vocab",
                "voc21",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "img_overlay.png").is_file()
    ids = rgb_to_ids(np.asarray(Image.open(out / "img_panoptic.png")))
    info = json.load(open(out / "img_panoptic.json"))
    assert ids.shape == (96, 120)
    assert {s["id"] for s in info["segments_info"]} == set(np.unique(ids).tolist()) - {0}
    assert info["categories"][1]["synonyms"] == ["dog", "puppy"]
    assert "segments (" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.jpg", "--vocab", "cat"], "image not found"),
        (["--vocab", "; ;"], "no category names"),
        (["--vocab", "cat;dog;cat"], "names two categories"),
        (["--vocab-file", "missing.txt"], "vocabulary file not found"),
        (["--dataset-vocab", "imagenet"], "unknown dataset vocabulary"),
        (["--vocab", "cat", "--checkpoint", "missing.ckpt"], "checkpoint not found"),
    ],
)
def test_demo_bad_input_exits_2_with_a_message(image, tmp_path, capsys, args, message):
    if "--image" not in args:
        args = ["--image", str(image), *args]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_demo_not_an_image(tmp_path, capsys):
    bad = tmp_path / "text.jpg"
    bad.write_text("hello")
    assert main(["--image", str(bad), "--vocab", "cat", "--output", str(tmp_path / "o")]) == 2
    assert "cannot decode image" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["existing file", "/dev/null", "readonly folder"])
def test_demo_unusable_output_fails_before_the_model_is_built(image, tmp_path, capsys, monkeypatch, kind):
    import os

    import odise_pl.demo as demo

    if kind == "readonly folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.setattr(demo, "load_model", lambda *a, **k: pytest.fail("the model was built first"))
    out = {"existing file": image, "/dev/null": "/dev/null", "readonly folder": tmp_path / "ro" / "out"}[kind]
    if kind == "readonly folder":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
    assert main(["--image", str(image), "--vocab", "cat", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(out) in err


def test_demo_full_disk_fails_before_the_model_is_built(image, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import odise_pl.demo as demo

    monkeypatch.setattr(demo, "load_model", lambda *a, **k: pytest.fail("the model was built first"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["--image", str(image), "--vocab", "cat", "--output", str(tmp_path / "o")]) == 2
    assert "No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5", "abc"])
def test_demo_short_edge_must_be_positive(image, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--image", str(image), "--vocab", "cat", "--output", str(tmp_path / "o"), "--short-edge", value]
        )
    assert exit_.value.code == 2 and "--short-edge" in capsys.readouterr().err


def test_vocabulary_file_with_a_bom(tmp_path):
    from odise_pl.data.vocab import load_vocab_file

    f = tmp_path / "v.txt"
    f.write_bytes("\ufeffcat,kitty\ndog\n".encode())
    assert load_vocab_file(f).names == [["cat", "kitty"], ["dog"]]
    f.write_bytes("\ufeff1:cat,kitty\n2:dog\n".encode())
    assert load_vocab_file(f).names == [["cat", "kitty"], ["dog"]]


def test_demo_applies_the_request_limits(image, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--image", str(image), "--vocab", "cat; " + "a" * 100, "--output", out]) == 2
    assert "over the limit of 64 (raise it with --max-word-chars)" in capsys.readouterr().err
    assert main(["--image", str(image), "--vocab", "cat", "--output", out, "--max-pixels", "1000"]) == 2
    assert "over the limit of 0.0" in capsys.readouterr().err  # 120x96 > 1000 pixels, from the header
    assert main(["--image", str(image), "--vocab", "cat", "--output", out, "--max-categories", "-1"]) == 2
    assert "--max-categories=-1" in capsys.readouterr().err
