"""Offline sentiment data: the human-rated sentences that ship inside the vaderSentiment source distribution.

The sdist of `vaderSentiment==3.3.2` on PyPI carries `additional_resources/hutto_ICWSM_2014.tar.gz`, the ground
truth of Hutto & Gilbert (ICWSM 2014): every sentence with the mean rating (-4 .. +4) of about 20 human raters.
Two files make two stand-ins for GLUE tasks that this machine cannot download:

* ``rt-sentences`` — 10,605 Rotten Tomatoes snippets (Pang & Lee, the source of SST). The sign of the rating is the
  label (1 = positive); the 37 sentences rated exactly 0 are dropped. Binary accuracy, like SST-2.
* ``tweets`` — 4,200 tweets with the rating as a regression target. Spearman correlation, like STS-B.

The archive is fetched once with pip (the ordinary PyPI client), checked against its sha256 and cached in
``$PEFT_STOC_CACHE`` (default ``~/.cache/peft-stoc``). The train/dev split is fixed: a shuffle by
``numpy.random.default_rng(SPLIT_SEED)`` of the file's rows, the first ``DEV_SIZE[task]`` rows are the dev set.
"""

from __future__ import annotations

import hashlib
import html
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

VADER_REQUIREMENT = "vadersentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
GROUND_TRUTH = {
    "rt-sentences": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
SPLIT_SEED = 2014
DEV_SIZE = {"rt-sentences": 1000, "tweets": 800}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_STOC_CACHE", Path.home() / ".cache" / "peft-stoc"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_vader_sdist(directory: Path | None = None) -> Path:
    """Path of the verified vaderSentiment sdist, downloaded with pip on first use."""
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / VADER_SDIST
    if target.exists() and _sha256(target) == VADER_SHA256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            tmp,
            VADER_REQUIREMENT,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / VADER_SDIST
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"Could not download the {VADER_REQUIREMENT} source distribution from the package index "
                f"(pip exit code {result.returncode}). The sentiment data ships inside it. Check that PyPI is "
                f"reachable, or fetch the file elsewhere with `pip download --no-deps --no-binary :all: "
                f"{VADER_REQUIREMENT}` and copy {VADER_SDIST} into {directory}.\n{result.stderr.strip()[-2000:]}"
            )
        found = _sha256(downloaded)
        if found != VADER_SHA256:
            raise RuntimeError(
                f"{VADER_SDIST} has sha256 {found}, expected {VADER_SHA256}: the download is corrupt or the "
                "index serves a different file. Refusing to use it."
            )
        shutil.move(str(downloaded), target)
    return target


def read_ground_truth(task: str, sdist: Path | None = None) -> list[tuple[float, str]]:
    """(mean rating, sentence) rows of a ground-truth file, in file order."""
    if task not in GROUND_TRUTH:
        raise ValueError(f"Unknown stand-in task {task!r}; choose one of {sorted(GROUND_TRUTH)}.")
    sdist = Path(sdist) if sdist is not None else fetch_vader_sdist()
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        text = inner.extractfile(GROUND_TRUTH[task]).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, rating, sentence = line.split("\t", 2)
        rows.append((float(rating), html.unescape(sentence.strip())))
    return rows


def load_stand_in(task: str, sdist: Path | None = None):
    """`datasets.DatasetDict` with `train` and `validation` splits, columns `sentence` and `label`.

    rt-sentences: int labels (1 = positive). tweets: float labels, the mean human rating.
    """
    from datasets import Dataset, DatasetDict

    rows = read_ground_truth(task, sdist)
    if task == "rt-sentences":
        rows = [(1 if rating > 0 else 0, sentence) for rating, sentence in rows if rating != 0]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    dev, train = order[: DEV_SIZE[task]], order[DEV_SIZE[task] :]

    def split(index):
        return Dataset.from_dict({"sentence": [rows[i][1] for i in index], "label": [rows[i][0] for i in index]})

    return DatasetDict(train=split(train), validation=split(dev))
