"""The stored window slots: a one-modality model's slots carry the layer inputs only
(its self-attention outputs are never read), other models' carry both, and slots
written in the first format (version 1, always both) are still read."""

from __future__ import annotations

import struct

import numpy as np
import torch

from model.config import ModelConfig
from model.engine import StreamingEngine, Utterance
from model.network import CFNESA
from model.state import SLOT_MAGIC, ConversationState

D, ACME, WINDOW = 16, 2, 4


def _engine(audio: bool) -> StreamingEngine:
    torch.manual_seed(3)
    cfg = ModelConfig(
        text_dim=8,
        audio_dim=4 if audio else 0,
        d_model=D,
        heads=2,
        acme_layers=ACME,
        window_utterances=WINDOW,
        label_names=("calm", "angry", "sad"),
    )
    return StreamingEngine(CFNESA(cfg), fingerprint="enc")


def _dialogue(n: int, audio: bool, seed: int = 0) -> list[Utterance]:
    rng = np.random.default_rng(seed)
    return [
        Utterance(
            speaker=("agent", "customer")[i % 2],
            text=rng.standard_normal(8).astype(np.float32),
            audio=rng.standard_normal(4).astype(np.float32) if audio and i % 3 else None,
        )
        for i in range(n)
    ]


def _stream(engine: StreamingEngine, utterances: list[Utterance]):
    """Step one utterance at a time through the parts, merged as the Redis store
    merges them; the results and the final store."""
    store: dict[str, bytes] = {}
    results = []
    for utt in utterances:
        state = ConversationState.from_parts(store) if store else None
        (res,), (state,) = engine.step([[utt]], [state])
        results.extend(res)
        store.update(state.to_parts(since=state.position - 1))
    return results, store, state


def _v1_slot(state: ConversationState, position: int) -> bytes:
    """A slot in the first format: version 1 header, inputs and self-attention outputs."""
    slots = state.win_x.shape[2]
    j = position - (state.position - slots)
    present = [i for i in range(state.win_x.shape[1]) if bool(state.win_present[j, i])]
    bits = sum(1 << i for i in present)
    head = struct.pack("<4sHQB", SLOT_MAGIC, 1, position, bits)
    x = state.win_x[:, present, j].numpy().astype("<f4").tobytes()
    s = state.win_s[:, present, j].numpy().astype("<f4").tobytes()
    return head + x + s


def test_a_text_only_slot_holds_the_layer_inputs_only_and_streams_exactly():
    engine = _engine(audio=False)
    dialogue = _dialogue(11, audio=False)
    results, store, last = _stream(engine, dialogue)
    slot = store["w0"]
    assert len(slot) == struct.calcsize("<4sHQBB") + ACME * D * 4  # no self-attention outputs
    back = ConversationState.from_parts(store)
    assert torch.equal(back.win_x, last.win_x) and torch.equal(back.rume_h, last.rume_h)
    assert not back.win_s.any()  # never stored, never read
    reference = engine.run_dialogue(dialogue)
    for a, b in zip(reference, results, strict=True):
        assert np.abs(a.probabilities - b.probabilities).max() <= 1e-5


def test_a_two_modality_slot_keeps_the_self_attention_outputs():
    engine = _engine(audio=True)
    dialogue = _dialogue(9, audio=True)
    results, store, last = _stream(engine, dialogue)
    back = ConversationState.from_parts(store)
    mask = last.win_present.T[None, :, :, None]  # (1, M, C, 1) over (A, M, C, d)
    assert torch.equal(back.win_s * mask, last.win_s * mask)
    assert back.win_s.any()
    reference = engine.run_dialogue(dialogue)
    for a, b in zip(reference, results, strict=True):
        assert np.abs(a.probabilities - b.probabilities).max() <= 1e-5


def test_slots_of_the_first_format_are_still_read():
    for audio in (False, True):
        engine = _engine(audio=audio)
        dialogue = _dialogue(10, audio=audio, seed=1)
        _, store, last = _stream(engine, dialogue)
        old = dict(store)
        for p in range(last.position - (WINDOW - 1), last.position):
            old[f"w{p % (WINDOW - 1)}"] = _v1_slot(last, p)
        back = ConversationState.from_parts(old)
        assert torch.equal(back.win_x, last.win_x)
        assert torch.equal(back.win_present, last.win_present)
        # the state read from version-1 slots continues exactly like the live one
        nxt = _dialogue(1, audio=audio, seed=9)
        (a,), _ = engine.step([nxt], [back])
        (b,), _ = engine.step([nxt], [last])
        assert np.array_equal(a[0].probabilities, b[0].probabilities)
