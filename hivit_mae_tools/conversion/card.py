"""The model card (README.md) of a converted folder: the one place that writes model cards."""

import json

from configuration_hivit_mae import HIVIT_ARCHS

from ..preprocessing import CROP_RATIO
from .mmpretrain import PARITY_TOLERANCE
from .types import ConversionReport

PAPER = '"HiViT: A Simpler and More Efficient Design of Hierarchical Vision Transformer", ICLR 2023'


def model_card(report: ConversionReport) -> str:
    """README.md of a converted folder: Hub metadata, description, where the weights come from (the source format's
    `source_description`), a usage snippet that runs as written, provenance and the verification figures."""
    from huggingface_hub import ModelCard, ModelCardData

    config, conversion = report.config, report.conversion
    arch = conversion.arch or next(
        (
            name
            for name, settings in HIVIT_ARCHS.items()
            if settings["hidden_size"] == config.hidden_size and settings["depths"] == config.depths
        ),
        "custom",
    )
    classifier = report.kind == "classification"
    data = ModelCardData(
        license=conversion.license,
        library_name="transformers",
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=["vision", "hivit", *conversion.tags]
        + (["image-classification"] if classifier else ["mae", "self-supervised", "masked-image-modeling"]),
        datasets=[report.dataset] if report.dataset else None,
    )
    model_id = report.model_id or str(report.output_dir)
    grid = config.image_size // config.patch_size
    if classifier:
        title = f"HiViT-{arch} image classifier"
        summary = f"A HiViT ({PAPER}) image classifier over {config.num_labels} classes."
        contents = (
            "Load it with `HiViTMAEForImageClassification` / `AutoModelForImageClassification`; `AutoModel` / "
            "`HiViTMAEModel` loads its encoder alone."
        )
        usage_class = "AutoModelForImageClassification"
        usage = (
            "    logits = model(**inputs).logits  # (batch_size, num_labels)\n"
            "print(model.config.id2label[logits.argmax(-1).item()])"
        )
    else:
        title = f"HiViT-{arch} MAE ({'encoder' if report.kind == 'encoder' else 'encoder + decoder'})"
        summary = (
            f"A HiViT ({PAPER}) image encoder pre-trained with masked autoencoding (MAE). The model was not "
            "fine-tuned: use its features, or fine-tune it on a downstream task."
        )
        if report.kind == "encoder":
            contents = (
                "This folder holds the **encoder only** (the source checkpoint has no decoder weights). Load it "
                "with `HiViTMAEModel` / `AutoModel`; `HiViTMAEForPreTraining` would leave the decoder randomly "
                "initialised."
            )
        else:
            contents = (
                "This folder holds the encoder and the MAE decoder. `AutoModel` / `HiViTMAEModel` loads the encoder "
                "for features; `AutoModelForPreTraining` / `HiViTMAEForPreTraining` adds the decoder and the pixel "
                "reconstruction loss (it masks 75% of the patches at random by default)."
            )
        usage_class = "AutoModel"
        usage = (
            "    features = model(**inputs).last_hidden_state  # (batch_size, "
            f"{grid**2}, {config.encoder_output_size})\n"
            "print(features.shape)"
        )
    if report.parity:
        figures = "\n".join(f"| {name} | {value:.2e} |" for name, value in report.parity.items())
        parity = (
            f"Outputs were compared with mmpretrain {_version('mmpretrain')}'s model built from the same weights, on "
            f"the same random images{'' if classifier else ' and mask'}, in float32 "
            f"(tolerance {PARITY_TOLERANCE}):\n\n"
            f"| output | max abs diff |\n|---|---|\n{figures}"
        )
    elif "mmpretrain" in conversion.tags:
        parity = "The outputs were not compared with mmpretrain's (`--verify-against-mmpretrain` was not given)."
    else:
        parity = ""
    unused = "None: every tensor of the source checkpoint was converted."
    if conversion.unused:
        listed = ", ".join(f"`{key}`" for key in conversion.unused[:20])
        more = f" and {len(conversion.unused) - 20} more" if len(conversion.unused) > 20 else ""
        unused = (
            f"{len(conversion.unused)} source tensors were left out ({listed}{more}). Reason: {report.unused_reason}"
        )
    notes = "".join(f"- {note}\n" for note in conversion.notes)
    body = f"""
# {title}

{summary}

{conversion.source_description}

{contents}

Architecture: hidden size {config.hidden_size}, depths {config.depths}, {config.num_attention_heads} attention heads,
patch size {config.patch_size}, image size {config.image_size} ({grid}x{grid} patches),
{report.num_parameters:,} parameters stored in {report.dtype}.

## Usage

The model code ships with the weights, so loading needs `trust_remote_code=True`.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, {usage_class}

model_id = {json.dumps(model_id)}
processor = AutoImageProcessor.from_pretrained(model_id)
model = {usage_class}.from_pretrained(model_id, trust_remote_code=True).eval()

image = Image.new("RGB", (640, 480), (124, 116, 104))  # or Image.open("your_image.jpg")
inputs = processor(images=image, return_tensors="pt").to(model.dtype)
with torch.no_grad():
{usage}
```

The image processor reproduces HiViT's evaluation preprocessing (mmpretrain's and the original repository's): resize
the short side to
{round(config.image_size / CROP_RATIO)} (bicubic), center-crop {config.image_size}x{config.image_size}, normalise
with the ImageNet mean and standard deviation.

## Conversion

- Source checkpoint: `{report.source.name}`
- SHA-256: `{report.sha256}`
- Stored dtype: {report.dtype}
- Tensors left out: {unused}
{notes}- Check: the written folder was reloaded and all {report.num_tensors_checked} tensors compared bit for bit with
  the source checkpoint's (cast to {report.dtype}); a forward pass gives finite outputs.

{parity}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"
