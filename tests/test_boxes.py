"""Radiologists' boxes and expert labels (issue 21): boxes mapped into the stored frame, NIH's BBox_List_2017.csv
with its real broken header, Google's adjudicated NIH labels packed as their own test set, and the Grad-CAM
localisation measures against boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_nih import nih_row, write_nih

from cxrdist.errors import UserError
from cxrdist.evaluate.localize import box_mask, measure, random_maps, summarise
from cxrdist.imaging import fit_boxes
from cxrdist.labels import NIH_EXPERT
from cxrdist.shards.shardset import ShardSet
from cxrdist.shards.tario import iter_shard
from cxrdist.sources import build_table

from runs import in_process


# --- the frame --------------------------------------------------------------------------------------------
def test_boxes_follow_the_letterbox_and_a_stated_frame():
    # a landscape 100 x 200 image letterboxed to 50: scale 0.25, 12 rows of padding above (50 - 25) // 2
    (b,) = fit_boxes([("Lung Opacity", 40, 20, 80, 40)], 100, 200, 50)
    assert b == {"label": "Lung Opacity", "x": 10.0, "y": 17.0, "w": 20.0, "h": 10.0}
    # NIH's boxes are in the 1024 frame; a copy of the PNGs at 256 px maps the same box to the same place
    stated = ("Nodule", 512, 256, 128, 64, 1024, 1024)
    assert fit_boxes([stated], 256, 256, 64) == fit_boxes([stated], 1024, 1024, 64)
    assert fit_boxes([stated], 256, 256, 64)[0] == {"label": "Nodule", "x": 32.0, "y": 16.0, "w": 8.0, "h": 4.0}


# --- NIH's expert files -----------------------------------------------------------------------------------
BBOX_TEXT = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"  # the real, broken header
    "00000001_000.png,Cardiomegaly,256.0,512.0,512.0,256.0,,,\n"
    "00000001_000.png,Infiltrate,100.5,100.5,50.25,60.75,,,\n"  # the file's spelling of Infiltration
    "00000005_000.png,Mass,abc,1,1,1,,,\n"  # line 4: not a number
    "00000005_000.png,Nodule,1000,1000,100,100,,,\n"  # line 5: leaves the 1024 frame
    "00000005_000.png,Lump,1,1,10,10,,,\n"  # line 6: no such finding
)


@pytest.fixture
def nih_root(tmp_path):
    root = write_nih(
        tmp_path / "nih",
        [
            nih_row("00000001_000.png", "Cardiomegaly|Infiltration", pid=1),
            nih_row("00000002_000.png", "Pneumothorax", pid=2),
            nih_row("00000003_000.png", "No Finding", pid=3),
            nih_row("00000005_000.png", "Mass", pid=5),
        ],
    )
    for i, stem in enumerate(["00000001_000", "00000002_000", "00000003_000", "00000005_000"]):
        folder = root / "images_001" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (256, 256), 60 + 20 * i).save(folder / f"{stem}.png")  # a 256 px copy of NIH's 1024
    (root / "BBox_List_2017.csv").write_text(BBOX_TEXT)
    return root


def test_the_bbox_file_with_its_broken_header_attaches_boxes_and_lists_bad_rows(nih_root):
    t = build_table("nih", nih_root, views="all")
    boxes = dict(zip(t.df["key"], t.df["boxes"]))
    assert boxes["00000001_000"] == (
        ("Cardiomegaly", 256.0, 512.0, 512.0, 256.0, 1024, 1024),
        ("Infiltration", 100.5, 100.5, 50.25, 60.75, 1024, 1024),
    )
    assert boxes["00000002_000"] == () and boxes["00000005_000"] == ()
    reasons = {s["source"]: s["reason"] for s in t.skipped}
    assert reasons["BBox_List_2017.csv:4"].startswith("a box coordinate is not a number")
    assert reasons["BBox_List_2017.csv:5"].startswith("box outside the 1024x1024 frame")
    assert reasons["BBox_List_2017.csv:6"] == "unknown Finding Label: 'Lump'"
    assert any("2 boxes on 1 images" in n for n in t.notes)


def test_packed_samples_carry_their_boxes_in_the_stored_frame(nih_root, tmp_path):
    assert in_process("shard", "--source", "nih", "--root", nih_root, "--out", tmp_path / "s", "--size", "64",
                      "--views", "all", "--min-shards", "1").returncode == 0  # fmt: skip
    metas = {
        key: json.loads(members["json"])
        for split in ("train", "val", "test")
        for shard in ShardSet.open(tmp_path / "s").shards(split)
        for _, key, members in iter_shard(shard)
    }
    assert metas["00000001_000"]["boxes"][0] == {"label": "Cardiomegaly", "x": 16.0, "y": 32.0, "w": 32.0, "h": 16.0}
    assert "boxes" not in metas["00000003_000"]


EXPERT_HEADER = "Image Index,Patient ID,Follow-up #,Patient Age,Patient Gender,View Position,"
EXPERT_TEXT = (
    EXPERT_HEADER + "Fracture,Pneumothorax,Airspace opacity,Nodule or mass,Set Id\n"
    "00000001_000.png,1,0,58,M,PA,NO,NO,YES,NO,test\n"
    "00000002_000.png,2,0,58,M,PA,NO,YES,NO,NO,validation\n"
    "00000003_000.png,3,0,58,M,PA,MAYBE,NO,NO,NO,test\n"  # line 4: not YES/NO
    "00000009_000.png,9,0,58,M,PA,NO,NO,NO,NO,test\n"  # line 5: not in Data_Entry
)


def test_google_expert_labels_pack_their_images_with_their_labels_and_split(nih_root, tmp_path):
    expert = tmp_path / "google2019_nih-chest-xray-labels.csv"
    expert.write_text(EXPERT_TEXT)
    t = build_table("nih", nih_root, views="all", expert_labels=expert)
    assert t.label_names == NIH_EXPERT and sorted(t.df["key"]) == ["00000001_000", "00000002_000"]
    df = t.df.set_index("key")
    assert df.loc["00000001_000", "Airspace opacity"] == 1.0 and df.loc["00000002_000", "Pneumothorax"] == 1.0
    assert (df.loc["00000001_000", "split"], df.loc["00000002_000", "split"]) == ("test", "val")
    reasons = {s["source"]: s["reason"] for s in t.skipped}
    assert reasons[f"{expert.name}:4"] == "Fracture is not YES or NO: 00000003_000.png"
    assert reasons[f"{expert.name}:5"].startswith("not in the NIH table")
    done = in_process("shard", "--source", "nih", "--root", nih_root, "--out", tmp_path / "s", "--size", "32",
                      "--views", "all", "--expert-labels", expert, "--min-shards", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["protocol"] == "nih/google-expert-2019" and m["label_set"] == "nih-expert"
    assert (m["splits"]["test"]["samples"], m["splits"]["val"]["samples"]) == (1, 1)


def test_a_reader_option_of_another_source_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--expert-labels is not an option of --source chexpert"):
        build_table("chexpert", tmp_path, expert_labels=tmp_path / "x.csv")


# --- the measures ---------------------------------------------------------------------------------------
def test_pointing_mass_ratio_and_iou_on_maps_with_known_answers():
    boxes = [{"label": "Nodule", "x": 4, "y": 4, "w": 4, "h": 4}, {"label": "Mass", "x": 0, "y": 0, "w": 2, "h": 2}]
    mask = box_mask(boxes, "Nodule", (16, 16))
    assert mask.sum() == 16 and mask[4:8, 4:8].all()
    inside = mask.astype(np.float32)
    assert measure(inside, mask) == (1.0, 16.0, 1.0)  # all mass in 1/16 of the image; the map is the box
    flat = np.ones((16, 16), np.float32)
    hit, ratio, iou = measure(flat, mask)
    assert ratio == pytest.approx(1.0) and iou == pytest.approx(16 / 256)
    assert measure(np.zeros((16, 16)), mask) == (0.0, 0.0, 0.0)  # a map that points nowhere misses
    far = np.zeros((16, 16), np.float32)
    far[12, 12] = 1
    assert measure(far, mask)[0] == 0.0


def test_random_maps_point_at_a_box_about_as_often_as_its_area():
    mask = box_mask([{"label": "x", "x": 0, "y": 0, "w": 16, "h": 8}], "x", (32, 32))  # 1/8 of the image
    maps = random_maps(np.random.default_rng(0), 400, (32, 32))
    assert maps.shape == (400, 32, 32) and np.allclose(maps.reshape(400, -1).max(1), 1)
    rate = np.mean([measure(m, mask)[0] for m in maps])
    assert 0.04 < rate < 0.25, rate
    got = summarise(np.array([[1.0, 2.0, 0.5], [0.0, 1.0, 0.1]]), ["a", "b"], 200, 0)
    assert got["pointing"][0] == 0.5 and got["pointing"][1] <= 0.5 <= got["pointing"][2]
