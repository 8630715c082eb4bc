"""CLI for the captions stage: ``captioner captions stats``."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence

STATS_HELP = """\
Summarise a caption file (or one split of it) after cleaning with the default rules
(lowercase, no punctuation, no tokens with digits, no one-letter tokens except "a").

Reports: images, captions, images without exactly 5 captions, vocabulary size at --min-count
(the 4 reserved tokens <pad> <unk> <start> <end> NOT included), maximum and 95th-percentile
caption length in cleaned words (<start>/<end> not counted; the percentile is the nearest-rank
one: 95% of captions have at most that many words), the 20 most frequent words, and problems
found while reading the file (count plus the first few, with line numbers).

examples:
  captioner captions stats --captions Flickr8k.token.txt --split Flickr_8k.trainImages.txt
  captioner captions stats --captions captions.txt --min-count 5 --json
"""

TOP_WORDS = 20
SHOW_PROBLEMS = 5


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captions stats``."""
    parser = sub.add_parser(
        "captions",
        help="inspect caption files (vocabulary, lengths)",
        description="Inspect caption files. Run `captioner captions stats --help`.",
    )
    inner = parser.add_subparsers(dest="captions_command", metavar="SUBCOMMAND")
    stats = inner.add_parser(
        "stats",
        help="counts, vocabulary size and caption lengths of a caption file or split",
        description=STATS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument(
        "--captions",
        required=True,
        metavar="FILE",
        help="caption file: Flickr8k token file (IMAGE#N<TAB>caption), Kaggle captions.txt CSV "
        "(image,caption), COCO captions JSON or Karpathy dataset_*.json; e.g. --captions "
        "Flickr8k.token.txt",
    )
    stats.add_argument(
        "--format",
        default="auto",
        choices=("auto", "flickr8k", "csv", "coco", "karpathy"),
        help="caption file format (default: auto, from the extension and first line); "
        "e.g. --format csv",
    )
    stats.add_argument(
        "--split",
        metavar="FILE|test",
        help="only the images listed in FILE, one name a line, or a split of a Karpathy file "
        "(train, val, test) (default: every image); e.g. --split Flickr_8k.trainImages.txt",
    )
    stats.add_argument(
        "--min-count",
        type=int,
        default=1,
        metavar="N",
        help="count a word in the vocabulary only if it occurs at least N times (default: 1); "
        "e.g. --min-count 5",
    )
    stats.add_argument(
        "--json",
        action="store_true",
        help="one JSON line (keys images, captions, vocab_size, max_length, "
        "p95_length, ...) instead of text; e.g. --json",
    )
    stats.set_defaults(handler=run_stats)
    parser.set_defaults(handler=lambda args: _print_help(parser))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def percentile_length(lengths: Sequence[int], q: float = 95.0) -> int:
    """Nearest-rank percentile: the smallest length at or above which q% of values lie."""
    if not lengths:
        return 0
    ordered = sorted(lengths)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def caption_stats(cleaned: Mapping[str, Sequence[str]], min_count: int = 1) -> dict[str, object]:
    """Counts, vocabulary size (reserved tokens excluded), lengths and top words."""
    words: Counter[str] = Counter()
    lengths = []
    for caps in cleaned.values():
        for caption in caps:
            tokens = caption.split()
            words.update(tokens)
            lengths.append(len(tokens))
    odd = [name for name, caps in cleaned.items() if len(caps) != 5]
    top = sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))[:TOP_WORDS]
    return {
        "images": len(cleaned),
        "captions": len(lengths),
        "images_without_5_captions": len(odd),
        "odd_images": odd[:SHOW_PROBLEMS],
        "min_count": min_count,
        "vocab_size": sum(1 for c in words.values() if c >= min_count),
        "words_total": len(words),
        "max_length": max(lengths, default=0),
        "p95_length": percentile_length(lengths),
        "mean_length": round(sum(lengths) / len(lengths), 3) if lengths else 0.0,
        "top_words": dict(top),
    }


def run_stats(args: argparse.Namespace) -> int:
    """Handler of ``captioner captions stats``."""
    from captioner.errors import CaptionerError
    from captioner.text.captions import filter_split, read_captions, split_names
    from captioner.text.cleaning import clean_captions

    if args.min_count < 1:
        raise CaptionerError(f"--min-count must be at least 1, got {args.min_count}")
    source = read_captions(args.captions, args.format)
    captions = source.captions
    problems = [str(p) for p in source.problems]
    if args.split:
        split = filter_split(captions, split_names(args.split, source))
        captions = split.captions
        problems += [f"{args.split}: {n!r} has no captions" for n in split.without_captions]
    stats = caption_stats(clean_captions(captions), args.min_count)
    stats["format"] = source.format
    stats["problems"] = len(problems)
    stats["first_problems"] = problems[:SHOW_PROBLEMS]
    print(json.dumps(stats) if args.json else format_stats(stats))  # --json: one JSON line
    return 0


def format_stats(stats: Mapping[str, object]) -> str:
    """Human-readable text of :func:`caption_stats` output."""
    lines = [
        f"images:                      {stats['images']}",
        f"captions:                    {stats['captions']}",
        f"images without 5 captions:   {stats['images_without_5_captions']}",
        f"vocabulary (count >= {stats['min_count']}):     {stats['vocab_size']}"
        "  (4 reserved tokens not included)",
        f"max caption length:          {stats['max_length']} words",
        f"95th percentile length:      {stats['p95_length']} words",
        f"mean caption length:         {stats['mean_length']} words",
        f"top {TOP_WORDS} words:",
    ]
    lines += [f"  {word:<12} {count}" for word, count in stats["top_words"].items()]  # type: ignore[union-attr]
    lines.append(f"problems:                    {stats['problems']}")
    lines += [f"  {p}" for p in stats["first_problems"]]  # type: ignore[union-attr]
    return "\n".join(lines)
