"""`cxrdist export`: a checkpoint's eval-mode model as ONNX (torch's exporter, ``torch.export``-based) or
TorchScript, with what it needs to be used correctly recorded beside the weights.

The exported graph takes the *normalised* input, ``B x C x image_size x image_size`` float32 (plus ``age`` and
``sex`` for a model with demographics fusion), and returns the logits; the batch dimension is dynamic. The
preprocessing that turns a packed image into that input is recorded as constants (``PREPROCESSING``: the
packed size and encoding, pixel scale, resize, mean, std), with the label names in output order and, where
`cxrdist eval` has fitted them, the temperature and operating thresholds: in the ONNX file's
``metadata_props`` (key ``cxrdist``) and in the TorchScript archive's extra file ``cxrdist.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cxrdist.errors import UserError
from cxrdist.evaluate import load_checkpoint, model_from_checkpoint
from cxrdist.evaluate.predict import operating_points
from cxrdist.labels import checkpoint_labels
from cxrdist.models import uses_demographics

FORMATS = ("onnx", "torchscript")


def describe(client: dict, points: dict) -> dict:
    """The constants a user of the exported model needs: inputs, preprocessing, outputs."""
    cfg, data = client["config"], client["data"]
    return {
        "inputs": ["image", "age", "sex"] if cfg["model"].get("fuse_demographics") else ["image"],
        "image": f"B x {cfg['model'].get('in_chans', 1)} x {data['image_size']} x {data['image_size']} float32",
        "preprocessing": {
            "packed_size": data["size"],
            "encoding": data["encoding"],
            "scale": "pixel / 255 (jpg, 8-bit) or / 65535 (png16)",
            "resize": f"shorter side to {data['image_size']} (bilinear, antialiased), centre crop",
            "mean": 0.5,
            "std": 0.25,
            "channels": "grey repeated to 3 when in_chans is 3",
        },
        "age": "years, NaN unknown",
        "sex": "1 male, 0 female, 0.5 unknown",
        "outputs": "logits in label order; probability = sigmoid(logit / temperature)",
        "labels": list(checkpoint_labels(client)),
        "model": cfg["model"]["name"],
        "temperature": points.get("temperature", 1.0),
        "thresholds": points.get("thresholds"),
        "operating_points": points.get("source"),
    }


def example_inputs(model: torch.nn.Module, client: dict, batch: int = 2) -> tuple[torch.Tensor, ...]:
    size, chans = client["data"]["image_size"], client["config"]["model"].get("in_chans", 1)
    x = torch.randn(batch, chans, size, size)
    if uses_demographics(model):
        return x, torch.tensor([55.0, float("nan")] * (batch // 2) + [40.0] * (batch % 2)), torch.full((batch,), 0.5)
    return (x,)


def export(checkpoint: Path, fmt: str, out: Path) -> dict:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    weights, client = load_checkpoint(Path(checkpoint), "best")
    model = model_from_checkpoint(weights, client)
    meta = describe(client, operating_points(Path(checkpoint), list(checkpoint_labels(client))))
    inputs = example_inputs(model, client)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _onnx(model, inputs, meta, out)
    else:
        traced = torch.jit.trace(model, inputs, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"cxrdist.json": json.dumps(meta)})
    return meta | {"file": str(out), "format": fmt}


def _onnx(model: torch.nn.Module, inputs: tuple, meta: dict, out: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise UserError("exporting ONNX needs onnx and onnxscript: pip install 'cxrdist[export]'") from None
    batch = torch.export.Dim("batch")
    names = meta["inputs"]
    torch.onnx.export(
        model,
        inputs,
        str(out),
        input_names=names,
        output_names=["logits"],
        dynamic_shapes=tuple({0: batch} for _ in names),
        dynamo=True,
    )
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cxrdist", json.dumps(meta)
    onnx.save(proto, str(out))
