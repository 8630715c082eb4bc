"""Caption loaders, splits, cleaning rules and the `captioner captions stats` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FLICKR_TEXT, needs_flickr

from captioner.cli import main
from captioner.commands.captions import percentile_length
from captioner.errors import CaptionerError
from captioner.text.caption_file import CaptionFile, Problem, split_copy_suffix
from captioner.text.captions import (
    detect_format,
    filter_split,
    load_captions,
    load_split,
    read_captions,
)
from captioner.text.cleaning import CleaningRules, clean_caption, clean_captions
from captioner.text.tokenizer import Tokenizer

TOKEN_LINES = [
    "a.jpg#0\tA dog runs .",
    "a.jpg#1\tThe dog, wet, runs!",
    "b.jpg#0\tTwo cats",
    "no tab here",
    "b.jpg#x\tbad number",
    "b.jpg#1\t   ",
    "",
    "c.jpg\tno hash",
    "b.jpg#2\tcat on 2 mats",
]


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- Flickr8k


def test_flickr_token_file_keeps_order_and_reports_bad_lines(tmp_path):
    path = write(tmp_path, "captions.token.txt", "\n".join(TOKEN_LINES) + "\n")
    result = read_captions(path)
    assert result.format == "flickr8k"
    assert result.captions == {
        "a.jpg": ["A dog runs .", "The dog, wet, runs!"],
        "b.jpg": ["Two cats", "cat on 2 mats"],
    }
    assert list(result.captions) == ["a.jpg", "b.jpg"]
    assert [(p.line, p.reason) for p in result.problems] == [
        (4, "no tab between id and caption"),
        (5, "caption number 'x' in 'b.jpg#x' is not a number"),
        (6, "empty caption for 'b.jpg#1'"),
        (8, "id 'c.jpg' is not IMAGE#N"),
    ]
    assert all(p.file == str(path) for p in result.problems)
    assert str(result.problems[0]) == f"{path}:4: no tab between id and caption"
    assert result.n_captions == 4


def test_load_captions_returns_dict_and_logs_problems(tmp_path, caplog):
    path = write(tmp_path, "t.txt", "\n".join(TOKEN_LINES))
    with caplog.at_level("WARNING", logger="captioner.text.captions"):
        captions = load_captions(path)
    assert captions == read_captions(path).captions
    assert "4 problem(s)" in caplog.text and ":4: no tab" in caplog.text


def test_stray_copy_suffix_is_renamed_when_image_has_no_captions(tmp_path):
    lines = [f"x.jpg.1#{i}\tcap {i}" for i in range(5)] + ["y.jpg#0\tother"]
    result = read_captions(write(tmp_path, "t.txt", "\n".join(lines)))
    assert result.captions == {"x.jpg": [f"cap {i}" for i in range(5)], "y.jpg": ["other"]}
    assert [p.line for p in result.problems] == [1, 2, 3, 4, 5]
    assert result.problems[0].reason == "renamed 'x.jpg.1' to 'x.jpg'"


def test_stray_copy_suffix_never_adds_a_sixth_caption(tmp_path):
    lines = ["x.jpg.1#0\tstray"] + [f"x.jpg#{i}\tcap {i}" for i in range(5)]
    result = read_captions(write(tmp_path, "t.txt", "\n".join(lines)))
    assert result.captions == {"x.jpg": [f"cap {i}" for i in range(5)]}
    assert result.problems == [
        Problem(
            str(tmp_path / "t.txt"),
            1,
            "dropped: 'x.jpg.1' duplicates 'x.jpg', which has its own captions",
        )
    ]


def test_split_copy_suffix():
    assert split_copy_suffix("2258277193_586949ec62.jpg.1") == ("2258277193_586949ec62.jpg", True)
    assert split_copy_suffix("a.JPEG.12") == ("a.JPEG", True)
    assert split_copy_suffix("a.jpg") == ("a.jpg", False)
    assert split_copy_suffix("a.1") == ("a.1", False)


def test_undecodable_line_is_a_problem_not_a_crash(tmp_path):
    data = b"a.jpg#0\tfine\nb.jpg#0\tbad \xff byte\nc.jpg#0\talso fine\n"
    result = read_captions(write(tmp_path, "t.txt", data))
    assert list(result.captions) == ["a.jpg", "c.jpg"]
    assert [(p.line, p.reason) for p in result.problems] == [(2, "not valid UTF-8")]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CaptionerError, match=r"nope\.txt: caption file not found"):
        load_captions(tmp_path / "nope.txt")


def test_file_without_any_caption_is_an_error(tmp_path):
    with pytest.raises(CaptionerError, match=r"t\.txt: no captions found"):
        read_captions(write(tmp_path, "t.txt", "junk\tline\n"))


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(CaptionerError, match="unknown caption format 'xml'"):
        read_captions(write(tmp_path, "t.txt", "a.jpg#0\tx"), fmt="xml")


# ----------------------------------------------------------------------------- CSV


def test_kaggle_csv_with_quoted_commas_and_quotes(tmp_path):
    text = (
        "image,caption\n"
        'a.jpg,"A dog, wet, runs ."\n'
        'a.jpg,"He said ""hi"" to me"\n'
        "b.jpg,simple caption\n"
        "b.jpg,too,many,fields\n"
        "c.jpg,\n"
        '"d.jpg","two\nline caption"\n'
        "d.jpg,after the multiline one\n"
    )
    result = read_captions(write(tmp_path, "captions.txt", text))
    assert result.format == "csv"
    assert result.captions == {
        "a.jpg": ["A dog, wet, runs .", 'He said "hi" to me'],
        "b.jpg": ["simple caption"],
        "d.jpg": ["two\nline caption", "after the multiline one"],
    }
    assert [(p.line, p.reason) for p in result.problems] == [
        (5, "expected 2 fields, found 4 (quote captions with commas)"),
        (6, "empty caption for 'c.jpg'"),
    ]


def test_csv_header_can_have_other_column_order(tmp_path):
    text = '\ufeffcaption,image\n"x, y",a.jpg\n'
    assert read_captions(write(tmp_path, "c.csv", text)).captions == {"a.jpg": ["x, y"]}


def test_csv_without_header_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path, "c.csv", "a.jpg,caption one\n")
    with pytest.raises(CaptionerError, match=r"c\.csv: the first line must be the CSV header"):
        read_captions(path)


# ----------------------------------------------------------------------------- COCO


def test_coco_json(tmp_path):
    doc = {
        "images": [
            {"id": 7, "file_name": "val/COCO_7.jpg"},
            {"id": 3, "file_name": "COCO_3.jpg"},
            {"id": 9},
        ],
        "annotations": [
            {"image_id": 3, "id": 1, "caption": "A cat. "},
            {"image_id": 7, "id": 2, "caption": "A dog."},
            {"image_id": 3, "id": 3, "caption": "Another cat"},
            {"image_id": 99, "id": 4, "caption": "orphan"},
            {"image_id": 7, "id": 5, "caption": "  "},
            {"id": 6},
        ],
    }
    result = read_captions(write(tmp_path, "captions_val.json", json.dumps(doc)))
    assert result.format == "coco"
    assert result.captions == {"COCO_7.jpg": ["A dog."], "COCO_3.jpg": ["A cat.", "Another cat"]}
    assert list(result.captions) == ["COCO_7.jpg", "COCO_3.jpg"]  # order of 'images'
    assert [(p.line, p.reason) for p in result.problems] == [
        (None, "images[2]: needs id and file_name"),
        (None, "annotations[3]: image_id 99 is not in 'images'"),
        (None, "annotations[4]: empty caption for 'COCO_7.jpg'"),
        (None, "annotations[5]: needs image_id and caption"),
    ]


def test_broken_json_reports_file_and_line(tmp_path):
    path = write(tmp_path, "c.json", '{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(CaptionerError, match=r"c\.json:3: invalid JSON"):
        read_captions(path)


def test_detect_format_by_extension_and_content(tmp_path):
    p = tmp_path / "x.txt"
    assert detect_format(tmp_path / "x.json", b"") == "coco"
    assert detect_format(tmp_path / "x.csv", b"") == "csv"
    assert detect_format(p, b'\n  {"images": []}') == "coco"
    assert detect_format(p, b"a.jpg#0\tcap") == "flickr8k"
    assert detect_format(p, b"image,caption\n") == "csv"
    with pytest.raises(CaptionerError, match="cannot tell the caption format"):
        detect_format(p, b"just words")


# ----------------------------------------------------------------------------- splits


def test_load_split_strips_skips_blanks_and_dedupes(tmp_path):
    path = write(tmp_path, "split.txt", " b.jpg\r\n\na.jpg\nb.jpg\n  \nc.jpg")
    assert load_split(path) == ["b.jpg", "a.jpg", "c.jpg"]


def test_load_split_missing_file(tmp_path):
    with pytest.raises(CaptionerError, match=r"split\.txt: caption file not found"):
        load_split(tmp_path / "split.txt")


def test_filter_split_reports_missing_captions_and_images(tmp_path):
    captions = {"a.jpg": ["x"], "b.jpg": ["y"], "c.jpg": ["z"]}
    result = filter_split(captions, ["c.jpg", "a.jpg", "zz.jpg"])
    assert result.captions == {"c.jpg": ["z"], "a.jpg": ["x"]}
    assert list(result.captions) == ["c.jpg", "a.jpg"]
    assert result.without_captions == ["zz.jpg"] and result.missing_images == []

    (tmp_path / "a.jpg").write_bytes(b"")
    result = filter_split(captions, ["c.jpg", "a.jpg", "zz.jpg"], images_dir=tmp_path)
    assert result.captions == {"a.jpg": ["x"]}
    assert result.without_captions == ["zz.jpg"] and result.missing_images == ["c.jpg"]


# ----------------------------------------------------------------------------- cleaning

TEXT = "A Dog's 2 tri-colored balls, 3rd in x Zoo!"


def test_clean_caption_default_rules():
    assert clean_caption(TEXT) == "a dogs tricolored balls in zoo"
    assert clean_caption("  ") == ""
    assert clean_caption("“Quoted” — dash… done") == "quoted dash done"


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (CleaningRules(lowercase=False), "A Dogs tricolored balls in Zoo"),
        (CleaningRules(strip_punctuation=False), "a dog's tri-colored balls, in zoo!"),
        (CleaningRules(drop_numeric=False), "a dogs tricolored balls 3rd in zoo"),
        (CleaningRules(min_token_length=1), "a dogs tricolored balls in x zoo"),
        (CleaningRules(keep_short=()), "dogs tricolored balls in zoo"),
        (CleaningRules(keep_short=("a", "x")), "a dogs tricolored balls in x zoo"),
        (CleaningRules(min_token_length=4), "a dogs tricolored balls"),
    ],
)
def test_each_cleaning_rule_toggles(rules, expected):
    assert clean_caption(TEXT, rules) == expected


def test_digits_survive_when_numeric_tokens_are_kept():
    rules = CleaningRules(drop_numeric=False, min_token_length=1)
    assert clean_caption(TEXT, rules) == "a dogs 2 tricolored balls 3rd in x zoo"


def test_cleaning_rules_dict_round_trip():
    rules = CleaningRules(lowercase=False, min_token_length=3, keep_short=("a", "I"))
    data = rules.to_dict()
    assert data == {
        "lowercase": False,
        "strip_punctuation": True,
        "drop_numeric": True,
        "min_token_length": 3,
        "keep_short": ["a", "I"],
    }
    assert CleaningRules.from_dict(json.loads(json.dumps(data))) == rules
    assert CleaningRules.from_dict({}) == CleaningRules()
    with pytest.raises(CaptionerError, match="unknown cleaning rule"):
        CleaningRules.from_dict({"stem": True})


def test_clean_captions_keeps_names_order_and_counts():
    raw = {"b.jpg": ["Hi there!", "7 8 9"], "a.jpg": ["A Cat."]}
    assert clean_captions(raw) == {"b.jpg": ["hi there", ""], "a.jpg": ["a cat"]}
    assert list(clean_captions(raw)) == ["b.jpg", "a.jpg"]


# ----------------------------------------------------------------------------- CLI


def test_percentile_length_is_nearest_rank():
    assert percentile_length(list(range(1, 101))) == 95
    assert percentile_length([3, 1, 2]) == 3
    assert percentile_length([4]) == 4
    assert percentile_length([]) == 0


def make_stats_files(tmp_path):
    lines = []
    for i in range(3):
        lines += [f"img{i}.jpg#{k}\tA dog number {k} runs in the park ." for k in range(5)]
    lines += ["img3.jpg#0\tA cat sleeps .", "broken line", "img0.jpg#9\t"]
    captions = write(tmp_path, "c.token.txt", "\n".join(lines))
    split = write(tmp_path, "split.txt", "img0.jpg\nimg3.jpg\nghost.jpg\n")
    return captions, split


def test_stats_json(tmp_path, capsys):
    captions, split = make_stats_files(tmp_path)
    argv = ["captions", "stats", "--captions", str(captions), "--split", str(split), "--json"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 2
    assert stats["captions"] == 6
    assert stats["images_without_5_captions"] == 1
    assert stats["odd_images"] == ["img3.jpg"]
    # img0: "a dog number runs in the park" (x5, "{k}" dropped); img3: "a cat sleeps"
    assert stats["vocab_size"] == 9
    assert stats["max_length"] == 7 and stats["p95_length"] == 7
    assert stats["top_words"]["a"] == 6 and stats["top_words"]["dog"] == 5
    assert list(stats["top_words"])[:4] == ["a", "dog", "in", "number"]  # ties: alphabetical
    assert stats["problems"] == 3
    assert stats["first_problems"][0].endswith(":17: no tab between id and caption")
    assert stats["first_problems"][2] == f"{split}: 'ghost.jpg' has no captions"


def test_stats_min_count_and_text_output(tmp_path, capsys):
    captions, _ = make_stats_files(tmp_path)
    assert main(["captions", "stats", "--captions", str(captions), "--min-count", "5"]) == 0
    out = capsys.readouterr().out
    assert "images:                      4" in out
    assert "captions:                    16" in out
    # count >= 5: a (16), dog, number, runs, in, the, park (15 each); cat, sleeps (1) are not
    assert "vocabulary (count >= 5):     7  (4 reserved tokens not included)" in out
    assert "problems:                    2" in out


def test_stats_errors_and_help(tmp_path, capsys):
    assert main(["captions", "stats", "--captions", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: caption file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["captions", "stats", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--captions", "--split", "--min-count", "--json", "--format", "examples:"):
        assert option in out


# ----------------------------------------------------------------------------- real data


@needs_flickr
@pytest.mark.shared
def test_real_flickr8k_splits_and_vocabulary():
    source = read_captions(FLICKR_TEXT / "Flickr8k.token.txt")
    assert isinstance(source, CaptionFile) and source.format == "flickr8k"
    assert source.n_captions == 40460 and len(source.captions) == 8092
    assert {p.line for p in source.problems} == {6731, 6732, 6733, 6734, 6735}
    assert len(source.captions["2258277193_586949ec62.jpg"]) == 5
    splits = {}
    for split in ("train", "dev", "test"):
        names = load_split(FLICKR_TEXT / f"Flickr_8k.{split}Images.txt")
        result = filter_split(source.captions, names)
        assert result.without_captions == []
        assert all(len(caps) == 5 for caps in result.captions.values())
        splits[split] = result.captions
    assert [len(s) for s in splits.values()] == [6000, 1000, 1000]
    assert not set(splits["train"]) & (set(splits["dev"]) | set(splits["test"]))

    train = [c for caps in clean_captions(splits["train"]).values() for c in caps]
    lengths = [len(c.split()) for c in train]
    vocab = {k: Tokenizer.build(train, min_count=k).vocab_size - 4 for k in (1, 5)}
    p95 = percentile_length(lengths)
    print(f"\ntrain vocab: {vocab}; max length {max(lengths)}; p95 {p95}")
    assert 7000 <= vocab[1] <= 8000 and 2000 <= vocab[5] <= 3000
    assert 30 <= max(lengths) <= 40 and 15 <= p95 <= 20
    assert Tokenizer.build(train).max_length == max(lengths) + 2


# ----------------------------------------------------------------------------- Karpathy JSON


def karpathy_doc(entries: list) -> str:
    return json.dumps({"images": entries, "dataset": "test"})


KARPATHY = [
    {"filename": "a.jpg", "split": "train", "imgid": 10**12,
     "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}, {"raw": "A\tdog\n"}]},
    {"filepath": "val2014", "filename": "b.jpg", "split": "val",
     "sentences": [{"raw": "Two cats", "sentid": 10**15}]},
    {"filename": "c.jpg", "split": "restval", "sentences": [{"tokens": ["a", "red", "ball"]}]},
    {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A blue sofa ."}]},
]  # fmt: skip


def test_karpathy_json_captions_names_and_splits(tmp_path):
    from captioner.text.captions import split_names

    result = read_captions(write(tmp_path, "dataset_x.json", karpathy_doc(KARPATHY)))
    assert result.format == "karpathy" and result.problems == []
    assert result.captions == {
        "a.jpg": ["A dog runs.", "A dog"],  # raw, on one line; cleaning comes later
        "val2014/b.jpg": ["Two cats"],  # filepath/filename, relative to --images-dir
        "c.jpg": ["a red ball"],  # tokens when there is no raw
        "d.jpg": ["A blue sofa ."],
    }
    assert result.splits == {"a.jpg": "train", "val2014/b.jpg": "val", "c.jpg": "restval",
                             "d.jpg": "test"}  # fmt: skip
    assert split_names("train", result) == ["a.jpg", "c.jpg"]  # restval counted as train
    assert split_names("val", result) == split_names("dev", result) == ["val2014/b.jpg"]
    assert split_names("test", result) == ["d.jpg"]
    assert clean_captions(result.captions)["a.jpg"] == ["a dog runs", "a dog"]


def test_karpathy_malformed_entries_are_one_line_each_with_index_and_field(tmp_path):
    entries = [
        "not an object",
        {"split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "a.jpg", "filepath": 3, "sentences": [{"raw": "x"}]},
        {"filename": "b.jpg", "sentences": "a dog"},
        {"filename": "c.jpg", "split": "train", "sentences": [{"raw": " "}, {"raw": "ok"}, 5]},
        {"filename": "../../etc/passwd", "sentences": [{"raw": "x"}]},
        {"filepath": "/abs", "filename": "d.jpg", "sentences": [{"raw": "x"}]},
        {"filename": "e.jpg", "split": "holdout", "sentences": [{"raw": "x"}]},
        {"filename": "f.jpg", "split": "test", "sentences": []},
    ]
    result = read_captions(write(tmp_path, "k.json", karpathy_doc(entries)))
    assert [(p.line, p.reason) for p in result.problems] == [
        (None, "images[0]: not an object"),
        (None, "images[1].filename: needs a file name"),
        (None, "images[2].filepath: needs a folder name (a string)"),
        (None, "images[3].sentences: needs a list"),
        (None, "images[4].sentences[0].raw: needs a non-empty caption"),
        (None, "images[4].sentences[2].raw: needs a non-empty caption"),
        (None, "images[5].filepath/filename: '../../etc/passwd' must be a relative path inside "
               "--images-dir"),
        (None, "images[6].filepath/filename: '/abs/d.jpg' must be a relative path inside "
               "--images-dir"),
        (None, "images[7].split: 'holdout' is not one of train, val, test, restval"),
    ]  # fmt: skip
    assert result.captions == {"c.jpg": ["ok"], "e.jpg": ["x"]}
    assert result.splits == {"c.jpg": "train"}  # f.jpg has no caption, e.jpg no known split


def test_karpathy_format_detection_and_errors(tmp_path):
    coco = b'{"images": [], "annotations": []}'
    karpathy = karpathy_doc(KARPATHY).encode()
    assert detect_format(tmp_path / "x.json", karpathy) == "karpathy"
    assert detect_format(tmp_path / "x.json", coco) == "coco"
    assert detect_format(tmp_path / "x.txt", b"\n" + karpathy) == "karpathy"
    with pytest.raises(CaptionerError, match=r"k\.json: not a Karpathy split file"):
        read_captions(write(tmp_path, "k.json", '{"images": 3, "sentences": 1}'))
    with pytest.raises(CaptionerError, match=r"k\.json: no captions found \(read as karpathy\)"):
        read_captions(
            write(tmp_path, "k.json", karpathy_doc([{"filename": "a.jpg", "sentences": []}]))
        )


def test_several_files_merge_and_a_clash_keeps_the_first(tmp_path, caplog):
    from captioner.text.captions import merge_files

    a = write(tmp_path, "a.txt", "x.jpg#0\tA dog\ny.jpg#0\tA cat\n")
    b = write(tmp_path, "b.json", karpathy_doc([
        {"filename": "y.jpg", "split": "val", "sentences": [{"raw": "Another cat"}]},
        {"filename": "z.jpg", "split": "test", "sentences": [{"raw": "A bird"}]},
    ]))  # fmt: skip
    merged = merge_files([a, b])
    assert merged.captions == {"x.jpg": ["A dog"], "y.jpg": ["A cat"], "z.jpg": ["A bird"]}
    assert merged.splits == {"z.jpg": "test"}
    assert [p.reason for p in merged.problems] == [
        "1 image name(s) clash with an earlier file, first 'y.jpg'"
    ]
    assert (
        "1 image name(s) also in an earlier caption file" in caplog.text and "y.jpg" in caplog.text
    )
    assert merge_files([a]).captions == read_captions(a).captions


def test_caption_inputs_write_the_merged_file_and_named_splits(tmp_path):
    from captioner.text.captions import caption_inputs

    a = write(tmp_path, "a.csv", "image,caption\nx.jpg,A dog\n")
    k = write(tmp_path, "k.json", karpathy_doc(KARPATHY))
    out = tmp_path / "out"
    assert caption_inputs([a], out) == (str(a), None)  # one file: read in place
    assert caption_inputs(a, out, "my_split.txt") == (str(a), "my_split.txt")
    assert not out.exists()
    merged, split = caption_inputs([a, k], out, "train")
    assert Path(merged).parent == out and Path(merged).name.startswith("captions-merged-")
    assert caption_inputs([a, k], out)[0] == merged  # same inputs, same file
    again = read_captions(merged)
    assert again.format == "karpathy" and again.captions == {"x.jpg": ["A dog"], **{
        n: c for n, c in read_captions(k).captions.items()}}  # fmt: skip
    assert again.splits == read_captions(k).splits
    assert load_split(split) == ["a.jpg", "c.jpg"] and Path(split).name == "split-train.txt"
    with pytest.raises(CaptionerError, match=r"split test: .*a\.csv holds no splits"):
        caption_inputs([a], out, "test")


def test_stats_of_a_karpathy_split(tmp_path, capsys):
    k = write(tmp_path, "k.json", karpathy_doc(KARPATHY))
    assert main(["captions", "stats", "--captions", str(k), "--split", "train", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["format"] == "karpathy" and stats["images"] == 2 and stats["captions"] == 3


@needs_flickr
@pytest.mark.shared
def test_flickr8k_as_karpathy_json_gives_the_same_captions_and_splits(tmp_path):
    """dataset_flickr8k.json written from the token and split files (one entry per id of the
    token file, the stray X.jpg.1 id included; the 92 images in no split get no "split") reads
    back to the same cleaned captions and splits."""
    from captioner.text.captions import split_names

    lines = (FLICKR_TEXT / "Flickr8k.token.txt").read_text().splitlines()
    raw: dict[str, list[str]] = {}
    for line in lines:
        key, caption = line.split("\t", 1)
        raw.setdefault(key.rpartition("#")[0], []).append(caption)
    files = {"train": "train", "val": "dev", "test": "test"}
    splits = {s: load_split(FLICKR_TEXT / f"Flickr_8k.{f}Images.txt") for s, f in files.items()}
    split_of = {n: s for s, names in splits.items() for n in names}
    entries = []
    for name, caps in raw.items():
        entry = {"filename": name, "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
        if name in split_of:
            entry["split"] = split_of[name]
        entries.append(entry)
    path = write(tmp_path, "dataset_flickr8k.json", karpathy_doc(entries))
    karpathy = read_captions(path)
    token = read_captions(FLICKR_TEXT / "Flickr8k.token.txt")
    assert karpathy.format == "karpathy" and len(karpathy.captions) == len(token.captions) == 8092
    assert clean_captions(karpathy.captions) == clean_captions(token.captions)
    assert list(karpathy.captions) == list(token.captions)
    for split, names in splits.items():
        assert len(names) == {"train": 6000, "val": 1000, "test": 1000}[split]
        assert set(split_names(split, karpathy)) == set(names)
        assert len(split_names(split, karpathy)) == len(names)
    assert [p.reason for p in karpathy.problems] == [
        "renamed '2258277193_586949ec62.jpg.1' to '2258277193_586949ec62.jpg'"
    ] * 5
    assert [p.reason for p in karpathy.problems] == [p.reason for p in token.problems]
