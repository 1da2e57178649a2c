import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# slow: a 4-run multirun (~30 s). The default suite covers sweep + table in tests/test_cluster.py
# and each captioner in tests/test_odise.py / below.
@pytest.mark.slow
def test_captioner_ablation_runs_every_captioner_and_collects_one_table(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "odise_pl.train",
        "-m",
        "ablation=captioner",
        "experiment=tiny",
        "trainer.max_steps=5",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        "callbacks.progress.refresh_rate=0",
        "trainer.enable_model_summary=false",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "train").iterdir())
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "collect_runs.py"), str(sweep)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| captioner=")]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"captioner={c}" for c in ("empty", "heuristic", "file", "implicit")
    ]
    assert all("failed" not in r for r in rows)


def test_caption_sources(synthetic_root):
    from odise_pl.data.coco_panoptic import COCOPanopticDataset

    root, _ = synthetic_root
    item = COCOPanopticDataset(root=str(root), caption_source="heuristic")[0]
    assert item["captions"][0].startswith("a photo of ") and "sky" in item["captions"][0]
    f = COCOPanopticDataset(
        root=str(root), caption_source=str(root / "annotations" / "generated_captions.json")
    )
    assert len(f[0]["captions"]) == 1


@pytest.mark.parametrize("captioner", ["empty", "heuristic", "file", "implicit", "text"])
def test_every_captioner_composes_reads_its_captions_and_gives_finite_losses(tmp_path, captioner):
    """What the (slow) ablation sweep runs, one training batch each, in process."""
    import torch

    from odise_pl.data.vocab import training_vocabulary
    from odise_pl.train import build

    from test_train import cfg_for

    datamodule, module, _ = build(cfg_for(tmp_path, f"captioner={captioner}"))
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.set_vocabulary(
        training_vocabulary(module.train_vocabulary, datamodule.categories), datamodule.isthing
    )
    batch = next(iter(datamodule.train_dataloader()))
    if captioner in ("heuristic", "file", "text"):
        assert batch["captions"] and all(isinstance(c, str) and c for c in batch["captions"])
    losses = module.compute_losses(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values())
