"""The incremental API: ``step(new utterances, states) -> (outputs, new states)``.

A pure function over explicit state: the engine holds the weights and nothing
about any conversation. Callers (the workers) keep states wherever they like,
as ``ConversationState`` objects or their bytes.

Example::

    engine = StreamingEngine.load()                       # the shipped checkpoint
    outs, states = engine.step([[Utterance("agent", text=v0)]], [None])
    outs, states = engine.step([[Utterance("customer", text=v1)]], states)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.config import ModelConfig
from model.errors import (
    DimensionError,
    FingerprintMismatchError,
    InputError,
    MissingModalityError,
    NonFiniteError,
)
from model.network import CFNESA, BatchState
from model.state import ConversationState


@dataclass(frozen=True)
class Utterance:
    """One utterance's inputs. A modality left None is absent.

    Feature vectors may be numpy arrays, torch tensors or lists of floats; they
    must be 1-D of the size the model was built for, and finite.
    """

    speaker: str
    text: Any = None
    audio: Any = None
    visual: Any = None


@dataclass(frozen=True)
class UtteranceResult:
    """The model's outputs for one utterance.

    Attributes:
        position: the utterance's index in its conversation (0-based).
        probabilities: (C,) emotion probabilities, in ``label_names`` order.
        emotion: the most probable label; confidence: its probability.
        shift_vs_previous: P(emotion differs from the previous utterance's),
            None for a conversation's first utterance.
        shift_vs_speaker_previous: P(emotion differs from this speaker's
            previous utterance's), None for a speaker's first utterance.
    """

    position: int
    speaker: str
    probabilities: np.ndarray
    emotion: str
    confidence: float
    shift_vs_previous: float | None
    shift_vs_speaker_previous: float | None


class StreamingEngine:
    """Runs a causal CFN-ESA model one chunk of utterances at a time.

    Args:
        model: a causal-mode ``CFNESA``; it is put in eval mode.
        fingerprint: the model's identity (``checkpoint.fingerprint``); states
            carry it and a state from another fingerprint is refused.
    """

    def __init__(self, model: CFNESA, fingerprint: str) -> None:
        if not model.config.causal:
            raise InputError("streaming needs a causal-mode model; this one is in paper mode")
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.fingerprint = fingerprint
        self.path: Path | None = None  # the checkpoint folder, when loaded from one
        self._mods = model.modalities

    @classmethod
    def load(cls, path: str | Path | None = None) -> StreamingEngine:
        """Load a checkpoint directory (default: the shipped streaming checkpoint)."""
        from model.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        engine = cls(ckpt.model, ckpt.fingerprint)
        engine.path = ckpt.path
        return engine

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.config.label_names

    def new_state(self) -> ConversationState:
        """The state of a conversation that has not started."""
        s = self.model.empty_state(1)
        return ConversationState(
            fingerprint=self.fingerprint,
            position=0,
            rume_h=s.rume_h[:, :, 0],
            win_x=s.win_x[:, :, 0],
            win_s=s.win_s[:, :, 0],
            win_present=s.win_present[0],
        )

    def load_state(self, parts: dict[str, bytes]) -> ConversationState:
        """Assemble a stored state (`ConversationState.to_parts`), refusing another
        model's state."""
        return ConversationState.from_parts(parts, expected_fingerprint=self.fingerprint)

    # -------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(
        self,
        chunks: Sequence[Sequence[Utterance]],
        states: Sequence[ConversationState | None],
        conversation_ids: Sequence[str] | None = None,
    ) -> tuple[list[list[UtteranceResult]], list[ConversationState]]:
        """Process new utterances of B conversations in one batch.

        Args:
            chunks: per conversation, its new utterances in order (usually one).
            states: per conversation, its state (None: a new conversation).
            conversation_ids: names used in error messages only.

        Returns:
            Per conversation the results of its new utterances, and its new
            state. The given states are not modified.

        Raises:
            InputError: a feature vector of the wrong size, non-finite, an
                utterance with no modality, an empty chunk.
            FingerprintMismatchError: a state written by another model.
        """
        if len(chunks) != len(states):
            raise InputError(f"{len(chunks)} chunks but {len(states)} states")
        ids = list(conversation_ids) if conversation_ids is not None else None
        if not chunks:
            return [], []
        full = [s if s is not None else self.new_state() for s in states]
        for i, s in enumerate(full):
            if s.fingerprint != self.fingerprint:
                raise FingerprintMismatchError(
                    f"state written by model {s.fingerprint}, this model is {self.fingerprint}",
                    conversation_id=ids[i] if ids else None,
                )
        batch = self._inputs(chunks, full, ids)
        stacked = BatchState(
            rume_h=torch.stack([s.rume_h for s in full], dim=2),
            win_x=torch.stack([s.win_x for s in full], dim=2),
            win_s=torch.stack([s.win_s for s in full], dim=2),
            win_present=torch.stack([s.win_present for s in full]),
        )
        out = self.model(
            batch.features,
            batch.present,
            batch.valid,
            batch.prev_index,
            batch.speaker_prev_index,
            state=stacked,
            fused_bank=batch.bank,
            return_state=True,
        )
        assert out.state is not None
        return self._results(
            chunks, full, out.logits, out.shift_prev, out.shift_speaker, out.fused, out.state
        )

    # ---------------------------------------------------------- full dialogue

    @torch.inference_mode()
    def run_dialogue(self, utterances: Sequence[Utterance]) -> list[UtteranceResult]:
        """The whole-dialogue causal forward (the training path, no state).

        The reference a streamed conversation must reproduce; also how a
        finished transcript is scored offline.
        """
        batch = self._inputs([utterances], [self.new_state()], None)
        out = self.model(
            batch.features, batch.present, batch.valid, batch.prev_index, batch.speaker_prev_index
        )
        results, _ = self._results(
            [utterances],
            [self.new_state()],
            out.logits,
            out.shift_prev,
            out.shift_speaker,
            None,
            None,
        )
        return results[0]

    # -------------------------------------------------------------- internals

    def _vector(self, value: Any, modality: str, where: str) -> np.ndarray:
        dim = self.config.dim(modality)
        if dim == 0:
            raise DimensionError(f"{where}: this model has no {modality} input")
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: {modality} features are not numbers") from exc
        if arr.shape != (dim,):
            raise DimensionError(
                f"{where}: {modality} features have shape {arr.shape}, the model takes ({dim},)"
            )
        if not np.isfinite(arr).all():
            raise NonFiniteError(f"{where}: {modality} features hold NaN or Inf")
        return arr

    def _inputs(
        self,
        chunks: Sequence[Sequence[Utterance]],
        states: Sequence[ConversationState],
        ids: list[str] | None,
    ) -> _Batch:
        b = len(chunks)
        seq = max(len(c) for c in chunks)
        mods = self._mods
        d = self.config.d_model
        feats = {m: np.zeros((b, seq, self.config.dim(m)), np.float32) for m in mods}
        present = np.zeros((b, seq, len(mods)), bool)
        valid = np.zeros((b, seq), bool)
        bank_size = max(len(s.speakers) for s in states)
        prev = np.full((b, seq), -1, np.int64)
        spk_prev = np.full((b, seq), -1, np.int64)
        bank = torch.zeros(b, bank_size, d)
        for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
            cid = ids[i] if ids else f"#{i}"
            if not chunk:
                raise InputError(
                    "empty chunk: each conversation needs at least one utterance",
                    conversation_id=cid,
                )
            # speaker -> index in cat(bank, fused) of their last utterance, in
            # order of recency, forgetting beyond max_speakers as the state does
            known: dict[str, int] = {}
            for j, (name, vec) in enumerate(state.speakers.items()):
                bank[i, j] = vec
                known[name] = j
            for t, utt in enumerate(chunk):
                where = f"conversation {cid}, utterance {state.position + t}"
                if not isinstance(utt.speaker, str):
                    raise InputError(f"{where}: speaker must be a string")
                for k, m in enumerate(mods):
                    value = getattr(utt, m)
                    if value is not None:
                        feats[m][i, t] = self._vector(value, m, where)
                        present[i, t, k] = True
                for m in ("text", "audio", "visual"):
                    if m not in mods and getattr(utt, m) is not None:
                        raise DimensionError(f"{where}: this model has no {m} input")
                if not present[i, t].any():
                    raise MissingModalityError(f"{where}: no modality present")
                valid[i, t] = True
                if known:
                    prev[i, t] = known[next(reversed(known))]
                spk_prev[i, t] = known.pop(utt.speaker, -1)
                known[utt.speaker] = bank_size + t
                while len(known) > self.config.max_speakers:
                    known.pop(next(iter(known)))
        active = [k for k in range(len(mods)) if present[..., k].any()]
        return _Batch(
            features={mods[k]: torch.from_numpy(feats[mods[k]]) for k in active},
            present=torch.from_numpy(present),
            valid=torch.from_numpy(valid),
            prev_index=torch.from_numpy(prev),
            speaker_prev_index=torch.from_numpy(spk_prev),
            bank=bank,
        )

    def _results(
        self,
        chunks: Sequence[Sequence[Utterance]],
        states: Sequence[ConversationState],
        logits: Tensor,
        shift_prev: Tensor,
        shift_speaker: Tensor,
        fused: Tensor | None,
        new: BatchState | None,
    ) -> tuple[list[list[UtteranceResult]], list[ConversationState]]:
        probs = torch.softmax(logits, dim=-1).numpy()  # (B, L, C)
        p_prev = torch.softmax(shift_prev, dim=-1)[..., 1].numpy()  # (B, L), NaN = none
        p_spk = torch.softmax(shift_speaker, dim=-1)[..., 1].numpy()
        labels = self.config.label_names
        results: list[list[UtteranceResult]] = []
        new_states: list[ConversationState] = []
        if new is not None:
            # conversation-major copies, so that each state's clone below is one
            # contiguous copy (a state must not keep the whole batch alive: clones)
            rume_h = new.rume_h.permute(2, 0, 1, 3).contiguous()  # (B, M, R, d)
            win_x = new.win_x.permute(2, 0, 1, 3, 4).contiguous()  # (B, A, M, C, d)
            # a one-modality model never reads win_s (model.network): its states hold
            # zeros, one tensor shared by the batch (never written in place)
            one = len(self._mods) == 1
            zeros_s = new.win_s.new_zeros(new.win_s[:, :, 0].shape)  # (A, M, C, d)
            win_s = None if one else new.win_s.permute(2, 0, 1, 3, 4).contiguous()
        for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
            row = []
            for t, utt in enumerate(chunk):
                p = probs[i, t]
                k = int(p.argmax())
                row.append(
                    UtteranceResult(
                        position=state.position + t,
                        speaker=utt.speaker,
                        probabilities=p.copy(),
                        emotion=labels[k],
                        confidence=float(p[k]),
                        shift_vs_previous=_maybe(p_prev[i, t]),
                        shift_vs_speaker_previous=_maybe(p_spk[i, t]),
                    )
                )
            results.append(row)
            if new is not None and fused is not None:
                speakers = dict(state.speakers)
                for t, utt in enumerate(chunk):
                    speakers.pop(utt.speaker, None)  # re-insert: most recent last
                    speakers[utt.speaker] = fused[i, t].clone()
                while len(speakers) > self.config.max_speakers:
                    speakers.pop(next(iter(speakers)))
                new_states.append(
                    ConversationState(
                        fingerprint=self.fingerprint,
                        position=state.position + len(chunk),
                        rume_h=rume_h[i].clone(),
                        win_x=win_x[i].clone(),
                        win_s=zeros_s if win_s is None else win_s[i].clone(),
                        win_present=new.win_present[i].clone(),
                        speakers=speakers,
                    )
                )
        return results, new_states


@dataclass
class _Batch:
    features: dict[str, Tensor]
    present: Tensor
    valid: Tensor
    prev_index: Tensor
    speaker_prev_index: Tensor
    bank: Tensor


def _maybe(x: float) -> float | None:
    return None if math.isnan(x) else float(x)
