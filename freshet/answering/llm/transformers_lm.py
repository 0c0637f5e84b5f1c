"""A local causal language model (transformers AutoModelForCausalLM), never downloaded.

LLM_MODEL names a local model directory. Passages that do not fit the model's context are
dropped from the end (the best come first), so the prompt never overflows the position table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from freshet.answering.llm.base import Answerer, LLMError
from freshet.answering.prompting import Prompt, build_prompt
from freshet.answering.retrieval import Passage

logger = logging.getLogger(__name__)


class TransformersAnswerer(Answerer):
    """Greedy generation with a local causal LM; one generation at a time per instance."""

    name = "transformers"

    def __init__(self, model_dir: str, *, max_new_tokens: int, device: str = "cpu") -> None:
        path = Path(model_dir).expanduser() if model_dir else None
        if path is None or not (path / "config.json").is_file():
            raise LLMError(
                "LLM_BACKEND=transformers needs FRESHET_LLM_MODEL set to a local model "
                f"directory with config.json, tokenizer and weights (got {model_dir!r})"
            )
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self.tokenizer: Any = AutoTokenizer.from_pretrained(
                    str(path), local_files_only=True
                )
                self.model: Any = AutoModelForCausalLM.from_pretrained(
                    str(path), local_files_only=True, dtype=torch.float32
                )
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        except (OSError, ValueError) as exc:
            raise LLMError(f"cannot load the language model from {path}: {exc}") from exc
        model: Any = self.model
        model.eval()
        model.to(device)
        self.device = device
        self.max_new_tokens = max_new_tokens
        config = self.model.config
        self.context = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 2048
        )
        self._lock = threading.Lock()

    def _render(self, prompt: Prompt) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text: str = self.tokenizer.apply_chat_template(
                prompt.messages(), add_generation_prompt=True, tokenize=False
            )
            return text
        return prompt.as_text()

    def _encode(self, question: str, passages: Sequence[Passage]) -> tuple[Any, int]:
        """Input ids that leave room for the answer, and how many passages they hold."""
        budget = max(self.context - self.max_new_tokens, 16)
        for count in range(len(passages), -1, -1):
            text = self._render(build_prompt(question, passages[:count]))
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] <= budget:
                return ids, count
        logger.warning("the question alone exceeds the model context; keeping its end")
        return ids[:, -budget:], 0

    def fit(self, question: str, passages: Sequence[Passage]) -> Sequence[Passage]:
        _, used = self._encode(question, passages)
        if used < len(passages):
            logger.info("model context fits %d of %d passages", used, len(passages))
        return passages[:used]

    def stream(self, question: str, passages: Sequence[Passage]) -> Iterator[str]:
        """The answer's text as it is generated. Generation runs on a thread of its own and
        stops at the next token when the caller stops reading (a client that went away, a
        process that is stopping): the thread is always waited for, so no generation outlives
        its request, and a process never exits with torch still running on a daemon thread
        (which aborts it)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids, _ = self._encode(question, passages)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        failure: list[BaseException] = []
        cancel = threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                rows = input_ids.shape[0]
                stop = cancel.is_set()
                return torch.full((rows,), stop, dtype=torch.bool, device=input_ids.device)

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        input_ids=ids.to(self.device),
                        attention_mask=torch.ones_like(ids).to(self.device),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        pad_token_id=pad,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    )
            except BaseException as exc:  # noqa: BLE001 - reported to the consumer below
                failure.append(exc)
                streamer.end()

        with self._lock:
            worker = threading.Thread(target=generate, name="freshet-generate")
            worker.start()
            try:
                yield from streamer
            finally:
                cancel.set()  # the reader is gone or done: stop at the next token
                worker.join()
        if failure:
            raise LLMError(f"generation failed: {failure[0]}") from failure[0]
