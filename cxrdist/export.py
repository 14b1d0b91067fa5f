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
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the file to write (e.g. {out / ('model.' + fmt)})")
    weights, client = load_checkpoint(Path(checkpoint), "best")
    model = model_from_checkpoint(weights, client)
    meta = describe(client, operating_points(Path(checkpoint), list(checkpoint_labels(client))))
    inputs = example_inputs(model, client)
    data = _onnx(model, inputs, meta) if fmt == "onnx" else _torchscript(model, inputs, meta)
    write_atomically(out, data)
    return meta | {"file": str(out), "format": fmt}


def write_atomically(out: Path, data: bytes) -> None:
    """The exported bytes, made in memory, written whole or not at all (temporary file, fsync, rename): a full
    disk or a read-only mount is one line naming the file, and leaves no truncated model behind. (Writing
    straight from torch.jit.save on a full disk aborts the process from C++.)"""
    from cxrdist.atomic import atomic_write_bytes

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, data)  # a failed write removes its temporary file; `out` is as it was
    except OSError as e:
        raise UserError(f"--out {out}: not written ({len(data) / 1e6:,.1f} MB): {e.strerror or e}") from None


def _torchscript(model: torch.nn.Module, inputs: tuple, meta: dict) -> bytes:
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript with a FutureWarning per call: the
        warnings.simplefilter("ignore", FutureWarning)  # format is what the user asked for, said once in the docs
        traced = torch.jit.trace(model, inputs, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={"cxrdist.json": json.dumps(meta)})
    return buf.getvalue()


def _onnx(model: torch.nn.Module, inputs: tuple, meta: dict) -> bytes:
    try:
        import onnx
    except ImportError:
        raise UserError("exporting ONNX needs onnx and onnxscript: pip install 'cxrdist[export]'") from None
    import tempfile

    batch = torch.export.Dim("batch")
    names = meta["inputs"]
    with tempfile.TemporaryDirectory(prefix="cxrdist-export-") as tmp:  # the exporter writes a file itself
        path = str(Path(tmp) / "model.onnx")
        torch.onnx.export(
            model,
            inputs,
            path,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=tuple({0: batch} for _ in names),
            dynamo=True,
        )
        proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cxrdist", json.dumps(meta)
    return proto.SerializeToString()
