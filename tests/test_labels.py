"""Label sets: the documented CheXpert <-> NIH mapping, --labels files, and the same-set refusal."""

from __future__ import annotations

import pytest

from cxrdist import labels
from cxrdist.errors import UserError


def test_counterparts_are_the_same_name_or_a_documented_pair():
    assert labels.counterpart("Effusion", labels.CHEXPERT) == "Pleural Effusion"
    assert labels.counterpart("Pleural Effusion", labels.NIH) == "Effusion"
    assert labels.counterpart("Cardiomegaly", labels.NIH) == "Cardiomegaly"
    for lacking in ("Mass", "Nodule", "Infiltration", "Hernia"):  # parts or neighbours, not the same finding
        assert labels.counterpart(lacking, labels.CHEXPERT) is None


def test_overlap_of_chexpert_and_nih_is_seven_findings_in_the_first_sets_order():
    pairs = labels.overlap(labels.CHEXPERT, labels.NIH)
    assert pairs == [
        ("Cardiomegaly", "Cardiomegaly"),
        ("Edema", "Edema"),
        ("Consolidation", "Consolidation"),
        ("Pneumonia", "Pneumonia"),
        ("Atelectasis", "Atelectasis"),
        ("Pneumothorax", "Pneumothorax"),
        ("Pleural Effusion", "Effusion"),
    ]
    assert {a for a, _ in labels.overlap(labels.NIH, labels.CHEXPERT)} == {b for _, b in pairs}


def test_resolve_sets_and_files(tmp_path):
    assert labels.resolve("nih") == labels.NIH and labels.resolve("chexpert") == labels.CHEXPERT
    f = tmp_path / "mine.txt"
    f.write_text("# the findings I care about\nEffusion\n\nCardiomegaly  # heart\n")
    assert labels.resolve(str(f)) == ("Effusion", "Cardiomegaly")
    f.write_text("Effusion\nsplit\n")
    with pytest.raises(UserError, match=r"mine\.txt:2: 'split' is not a usable label name"):
        labels.resolve(str(f))
    f.write_text("Effusion\nEffusion\n")
    with pytest.raises(UserError, match=r"mine\.txt:2: label 'Effusion' is listed twice"):
        labels.resolve(str(f))
    f.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="no label names"):
        labels.resolve(str(f))
    with pytest.raises(
        UserError, match=r"neither a label set \(chexpert, nih, nih-expert, padchest, rsna\) nor a file"
    ):
        labels.resolve(str(tmp_path / "absent.txt"))


def test_check_same_names_both_sets():
    labels.check_same(labels.NIH, list(labels.NIH), what="a", against="b")
    with pytest.raises(UserError, match=r"shards/manifest\.json has labels chexpert \(14 labels\), but run has nih"):
        labels.check_same(labels.NIH, labels.CHEXPERT, what="shards/manifest.json", against="run")
    with pytest.raises(UserError, match=r"\[Edema, Effusion\]"):  # same names, another order: also refused
        labels.check_same(("Effusion", "Edema"), ("Edema", "Effusion"), what="x", against="y")
    assert labels.checkpoint_labels({"data": {"labels": ["Edema"]}}) == ("Edema",)
    assert labels.checkpoint_labels({}) == labels.CHEXPERT  # checkpoints from before label sets
