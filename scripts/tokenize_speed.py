"""Tokenizing throughput of the local-text-files reader on a sample of a site-packages tree.

    python scripts/tokenize_speed.py [SITE_PACKAGES] [--every 8]

Prints files, bytes, tokens, bytes per token and MB/s with 1 and 2 worker processes, for planning
how long the scale grid's corpus (issue 12) takes to tokenize on another machine.
"""

import argparse
import glob
import sys
import time
from pathlib import Path

from basis_train.data.textfiles import tokenize_files
from basis_train.data.tokenizer import get_encoding

p = argparse.ArgumentParser()
p.add_argument("site", nargs="?", default=str(Path(sys.prefix) / "lib" / f"python{sys.version_info.major}."
                                           f"{sys.version_info.minor}" / "site-packages"))
p.add_argument("--every", type=int, default=8, help="take every N-th file of the sorted list")
p.add_argument("--workers", default="1,2")
a = p.parse_args()
files = sorted(Path(f) for f in glob.glob(a.site + "/**/*.py", recursive=True))
sample = files[:: a.every]
print(f"{len(files)} .py files under {a.site}; sample: every {a.every}th, {len(sample)} files")
get_encoding()  # BPE load outside the timing
for w in map(int, a.workers.split(",")):
    t = time.perf_counter()
    _, _, st = tokenize_files(sample, workers=w)
    dt = time.perf_counter() - t
    print(f"workers={w}: {dt:.1f}s, {st['bytes_used']:,} bytes, {st['n_tokens']:,} tokens, "
          f"{st['bytes_used'] / st['n_tokens']:.2f} bytes/token, {st['bytes_used'] / dt / 1e6:.2f} MB/s "
          f"(duplicates {st['n_duplicates']}, empty {st['n_empty']}, skipped "
          f"{st['n_unreadable'] + st['n_not_utf8'] + st['n_binary']})")
