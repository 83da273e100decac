"""The README's Python snippets run as written, and the shapes its comments state are the real ones."""

import json
import re
from pathlib import Path

import torch

from configuration_hivit_mae import HiViTMAEConfig
from hivit_mae_tools.preprocessing import preprocessor_config
from modeling_hivit_mae import HiViTMAEForImageClassification, HiViTMAEForPreTraining

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippets_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4
    # The folders the snippets load ("converted/", "hivit-mae-base"): what the converter or a pre-training run
    # writes, at the tiny size.
    monkeypatch.chdir(tmp_path)
    model = HiViTMAEForPreTraining(HiViTMAEConfig.from_arch("tiny"))
    for folder in ("converted", "hivit-mae-base"):
        model.save_pretrained(folder)
        (tmp_path / folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(224)))
    # "hivit-base-in1k": what converting the original fine-tuned file writes, at the tiny size.
    config = HiViTMAEConfig.from_arch("tiny", use_fc_norm=True, num_labels=4)
    HiViTMAEForImageClassification(config).save_pretrained("hivit-base-in1k")
    (tmp_path / "hivit-base-in1k" / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(224)))

    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)

    # The first snippet's comments.
    out, feats = namespace["out"], namespace["feats"]
    assert out.loss.shape == ()
    assert (out.logits.shape, out.mask.shape, out.ids_restore.shape) == ((2, 196, 768), (2, 196), (2, 196))
    assert feats.shape == (2, 196, 384)
    assert torch.equal(out.mask.sum(dim=1), torch.tensor([147.0, 147.0]))  # "75 % of the patches masked"
    # The pre-trained weights' snippet: three predictions with the folder's class names.
    assert {p["label"] for p in namespace["predictions"]} <= set(config.id2label.values())
    assert len(namespace["predictions"]) == 3

    # The backbone snippet's comments.
    shapes = [tuple(feature_map.shape) for feature_map in namespace["maps"]]
    assert shapes == [(1, 96, 64, 80), (1, 192, 32, 40), (1, 384, 16, 20), (1, 384, 8, 10)]
    assert (namespace["backbone"].channels, namespace["backbone"].strides) == ([96, 192, 384, 384], [4, 8, 16, 32])
