"""The on-the-fly dataset: frame budget (even drops, counted), skipping unreadable clips, the collator."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from videonsa import testing
from videonsa.errors import UserError
from videonsa.training.annotations import read_annotations
from videonsa.training.collator import VideoChatCollator
from videonsa.training.config import DataSettings
from videonsa.training.conversation import IGNORE_INDEX
from videonsa.training.dataset import STAT_NAMES, VideoChatDataset, even_positions
from videonsa.video.synthetic import read_frame_index, write_image_folder, write_video

FRAME_SIDE = 112  # 112 x 112 at most 112 * 112 pixels: 16 tokens per frame, and the frame index stays readable


def settings(**changes) -> DataSettings:
    base = DataSettings(annotations=["unused"], min_pixels=784, max_pixels=FRAME_SIDE * FRAME_SIDE,
                        max_tokens=4096, sample_fps=4.0)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def frames_sample(record_id: str, folder: str, count: int) -> dict:
    return {"id": record_id, "messages": [
        {"role": "user", "content": "<video>Which frame is first?"}, {"role": "assistant", "content": "zero"}],
        "images": [f"{folder}/frame_{i}.png" for i in range(1, count + 1)]}


@pytest.fixture(scope="module")
def twelve_frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("twelve")
    write_image_folder(root / "clip", frame_count=12, width=FRAME_SIDE, height=FRAME_SIDE, suffix=".png")
    path = root / "a.jsonl"
    path.write_text(json.dumps(frames_sample("twelve", "clip", 12)) + "\n")
    return read_annotations(path).samples


def text_tokens(tokenizer, samples) -> int:
    """Tokens of the sample without its frames (each frame costs 16 vision tokens + start/end)."""
    item = VideoChatDataset(samples, tokenizer, settings())[0]
    return len(item["input_ids"]) - 12 * (16 + 2)


def test_a_sample_within_budget_keeps_every_frame(tokenizer, twelve_frames):
    item = VideoChatDataset(twelve_frames, tokenizer, settings())[0]
    assert [read_frame_index(frame) for frame in item["vision_frames"].numpy()] == list(range(12))
    assert item["image_grid_thw"].tolist() == [[1, 8, 8]] * 12
    assert int((item["input_ids"] == testing.TOKEN_IDS["<|image_pad|>"]).sum()) == 12 * 16
    assert dict(zip(STAT_NAMES, item["data_stats"].tolist(), strict=True)) == {
        "samples_skipped": 0, "samples_trimmed": 0, "frames_dropped": 0, "frames_kept": 12}


def test_over_budget_frames_are_dropped_evenly_and_counted(tokenizer, twelve_frames):
    budget = text_tokens(tokenizer, twelve_frames) + 5 * 18 + 10  # room for five frames, not six
    item = VideoChatDataset(twelve_frames, tokenizer, settings(max_tokens=budget))[0]
    assert len(item["input_ids"]) <= budget
    kept = [read_frame_index(frame) for frame in item["vision_frames"].numpy()]
    assert kept == list(even_positions(12, 5)) == [1, 3, 6, 8, 10]
    assert item["data_stats"].tolist() == [0, 1, 7, 5]
    assert len(item["image_grid_thw"]) == 5


def test_video_mode_counts_two_frames_per_patch(tokenizer, twelve_frames):
    dataset = VideoChatDataset(twelve_frames, tokenizer, settings(frames_as="video"))
    item = dataset[0]
    assert item["video_grid_thw"].tolist() == [[6, 8, 8]]
    assert int((item["mm_token_type_ids"] == 2).sum()) == 6 * 16
    assert item["second_per_grid_ts"].tolist() == [pytest.approx(0.5)]  # 2 frames at the nominal 4 fps


def test_max_frames_caps_before_the_budget(tokenizer, twelve_frames):
    item = VideoChatDataset(twelve_frames, tokenizer, settings(max_frames=4))[0]
    assert [read_frame_index(frame) for frame in item["vision_frames"].numpy()] == [1, 4, 7, 10]
    assert item["data_stats"].tolist() == [0, 0, 8, 4]  # capped, not trimmed for the budget


def test_video_files_are_sampled_at_the_requested_rate(tokenizer, tmp_path):
    write_video(tmp_path / "v.mp4", frame_count=30, fps=10, width=FRAME_SIDE, height=FRAME_SIDE)
    record = {"id": "v", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<image>Which?"}, {"from": "gpt", "value": "This."}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n")
    samples = read_annotations(tmp_path / "a.jsonl").samples
    item = VideoChatDataset(samples, tokenizer, settings())[0]
    # 3 s at 4 fps: 12 frames, one every 0.25 s of a 10 fps video (frames 0, 2.5 -> 2, 5, 7.5 -> 7, ...).
    indices = [read_frame_index(frame) for frame in item["vision_frames"].numpy()]
    assert len(indices) == 12
    assert indices == [int(k * 2.5) for k in range(12)]


def test_unreadable_samples_are_skipped_logged_and_counted(tokenizer, tmp_path, caplog):
    write_image_folder(tmp_path / "good", frame_count=4, width=56, height=56, suffix=".png")
    shutil.copytree(tmp_path / "good", tmp_path / "damaged")
    (tmp_path / "damaged" / "frame_2.png").write_bytes(b"not a png")
    records = [
        frames_sample("first", "good", 4),
        frames_sample("gone", "nowhere", 4),
        frames_sample("damaged", "damaged", 4),
        {"id": "novideo", "video": "missing.mp4", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        frames_sample("last", "good", 4),
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = VideoChatDataset(read_annotations(tmp_path / "a.jsonl").samples, tokenizer, settings())
    with caplog.at_level(logging.WARNING, logger="videonsa.training"):
        item = dataset[1]
    assert item["data_stats"][0].item() == 3  # gone, damaged and novideo skipped; "last" served instead
    skipped = [record.getMessage() for record in caplog.records]
    assert len(skipped) == 3 and all(message.startswith("skipping sample") for message in skipped)
    assert "gone" in skipped[0] and "damaged" in skipped[1] and "novideo" in skipped[2]
    torch.testing.assert_close(item["input_ids"], dataset[0]["input_ids"])  # same text as sample "first"


def test_a_dataset_of_only_bad_clips_stops_with_a_clear_error(tokenizer, tmp_path):
    records = [frames_sample(f"gone{i}", "nowhere", 2) for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = VideoChatDataset(read_annotations(tmp_path / "a.jsonl").samples, tokenizer,
                               settings(max_consecutive_skips=2))
    with pytest.raises(UserError, match="3 samples in a row"):
        dataset[0]


def test_collator_pads_on_the_right_and_sums_the_counters(tokenizer, twelve_frames):
    dataset = VideoChatDataset(twelve_frames, tokenizer, settings())
    short = VideoChatDataset(twelve_frames, tokenizer, settings(max_frames=2))[0]
    long = dataset[0]
    batch = VideoChatCollator(pad_token_id=tokenizer.pad_token_id)([short, long])
    length = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, length)
    pad = length - len(short["input_ids"])
    assert batch["input_ids"][0, -pad:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, -pad:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(short["input_ids"]), length]
    assert batch["mm_token_type_ids"][0, -pad:].eq(0).all()
    assert batch["image_grid_thw"].shape == (14, 3)
    assert [clip.shape[0] for clip in batch["vision_frames"]] == [2, 12]
    assert batch["data_stats"].tolist() == [0, 0, 10, 14]


def test_even_positions_spread_over_the_whole_clip():
    assert even_positions(10, 10) == tuple(range(10))
    assert even_positions(550, 275) == tuple(range(1, 550, 2))
    chosen = even_positions(1000, 7)
    assert len(set(chosen)) == 7 and chosen[0] < 100 and chosen[-1] > 900
    gaps = np.diff(chosen)
    assert gaps.max() - gaps.min() <= 1


def test_an_oversized_frame_image_skips_the_sample_like_a_bad_video(tokenizer, tmp_path, monkeypatch, caplog):
    from PIL import Image

    write_image_folder(tmp_path / "small", frame_count=4, width=56, height=56, suffix=".png")
    write_image_folder(tmp_path / "big", frame_count=4, width=56, height=56, suffix=".png")
    Image.new("RGB", (300, 300)).save(tmp_path / "big" / "frame_3.png")  # a bomb in the middle of the clip
    lines = [frames_sample("bomb", "big", 4), frames_sample("fine", "small", 4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = VideoChatDataset(read_annotations(tmp_path / "a.jsonl").samples, tokenizer, settings())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300 x 300 is then over twice the limit
    with caplog.at_level(logging.WARNING, logger="videonsa.training"):
        item = dataset[0]
    assert item["data_stats"][0] == 1  # the bomb's sample skipped, the next one used
    assert "bomb" in caplog.text and "too large" in caplog.text


def test_frame_images_are_resized_as_each_is_read(tokenizer, tmp_path, monkeypatch):
    """At most one full-resolution image is alive at a time, however many frames a sample has."""
    import gc

    from PIL import Image

    side = 560
    write_image_folder(tmp_path / "clip", frame_count=8, width=side, height=side, suffix=".png")
    (tmp_path / "a.jsonl").write_text(json.dumps(frames_sample("big", "clip", 8)) + "\n")
    dataset = VideoChatDataset(read_annotations(tmp_path / "a.jsonl").samples, tokenizer, settings())
    peak = []
    resize = Image.Image.resize

    def counting_resize(self, *args, **kwargs):
        full = [obj for obj in gc.get_objects()
                if issubclass(type(obj), Image.Image) and obj.size == (side, side) and obj._im is not None]
        peak.append(len(full))
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", counting_resize)
    item = dataset[0]
    assert item["vision_frames"].shape == (8, FRAME_SIDE, FRAME_SIDE, 3)
    assert peak and max(peak) <= 2
