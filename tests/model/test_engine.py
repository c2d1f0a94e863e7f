"""The incremental API's contract: typed errors for bad input, state bytes
that refuse another model, and outputs that make sense."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.engine import StreamingEngine, Utterance
from model.errors import (
    DimensionError,
    FingerprintMismatchError,
    InputError,
    MissingModalityError,
    NonFiniteError,
    StateFormatError,
)
from model.network import CFNESA
from model.state import CORE, FORMAT_VERSION, ConversationState, parts_size


@pytest.fixture(scope="module")
def engine() -> StreamingEngine:
    torch.manual_seed(0)
    cfg = ModelConfig(
        text_dim=8,
        audio_dim=4,
        d_model=16,
        heads=2,
        acme_layers=1,
        window_utterances=3,
        label_names=("calm", "angry", "sad"),
    )
    return StreamingEngine(CFNESA(cfg), fingerprint="abc")


def _utt(speaker="agent", **kw):
    return Utterance(speaker=speaker, **({"text": np.ones(8, np.float32)} | kw))


@pytest.mark.parametrize(
    ("utterance", "error"),
    [
        (_utt(text=np.ones(7)), DimensionError),
        (_utt(text=np.ones((2, 4))), DimensionError),
        (_utt(text=np.r_[np.ones(7), np.nan]), NonFiniteError),
        (_utt(text=np.r_[np.ones(7), np.inf]), NonFiniteError),
        (_utt(text=None), MissingModalityError),
        (_utt(visual=np.ones(5)), DimensionError),  # the model has no visual branch
        (_utt(audio=np.ones(3)), DimensionError),
        (_utt(text=["a"] * 8), InputError),
    ],
)
def test_bad_input_raises_typed_errors(engine, utterance, error):
    with pytest.raises(error) as info:
        engine.step([[utterance]], [None], conversation_ids=["call-7"])
    assert "call-7" in str(info.value)


def test_nothing_is_reshaped_and_lists_are_accepted(engine):
    (res,), _ = engine.step([[_utt(text=[0.5] * 8)]], [None])
    assert res[0].probabilities.shape == (3,)
    assert abs(float(res[0].probabilities.sum()) - 1) < 1e-5


def test_empty_chunk_and_mismatched_lengths(engine):
    with pytest.raises(InputError):
        engine.step([[]], [None])
    with pytest.raises(InputError):
        engine.step([[_utt()]], [None, None])


def test_state_from_another_model_is_refused(engine):
    _, (state,) = engine.step([[_utt()]], [None])
    other = ConversationState.from_parts(state.to_parts())
    other.fingerprint = "other-model"
    with pytest.raises(FingerprintMismatchError):
        engine.step([[_utt()]], [other])
    with pytest.raises(FingerprintMismatchError):
        engine.load_state(other.to_parts())


def test_state_parts_format_checks(engine):
    _, (state,) = engine.step([[_utt(), _utt("customer", audio=np.ones(4))]], [None])
    parts = state.to_parts()
    back = engine.load_state(parts)
    assert back.position == 2 and list(back.speakers) == ["agent", "customer"]
    assert torch.equal(back.win_present, state.win_present)
    # the window of a modality is stored where it is present; absent slots load as zeros
    mask = state.win_present.T[None, :, :, None]  # (1, M, C, 1) over (A, M, C, d)
    assert torch.equal(back.win_x * mask, state.win_x * mask)
    assert torch.equal(back.rume_h, state.rume_h)
    data = parts[CORE]
    wrong_version = data[:4] + (FORMAT_VERSION + 1).to_bytes(2, "little") + data[6:]
    for bad in (b"", b"nope" + data[4:], wrong_version, data[:-4], data + b"\0"):
        with pytest.raises(StateFormatError):
            engine.load_state({**parts, CORE: bad})
    slot = next(k for k in parts if k != CORE)
    for bad in (parts[slot][:-4], b"CFNX" + parts[slot][4:]):
        with pytest.raises(StateFormatError):
            engine.load_state({**parts, slot: bad})
    with pytest.raises(StateFormatError):
        engine.load_state({k: v for k, v in parts.items() if k != slot})


def test_first_utterances_have_no_shift_and_later_ones_do(engine):
    chunk = [_utt("agent"), _utt("customer"), _utt("agent")]
    (res,), _ = engine.step([chunk], [None])
    assert res[0].shift_vs_previous is None and res[0].shift_vs_speaker_previous is None
    assert res[1].shift_vs_previous is not None and res[1].shift_vs_speaker_previous is None
    assert res[2].shift_vs_previous is not None and res[2].shift_vs_speaker_previous is not None
    assert all(0 <= r.shift_vs_previous <= 1 for r in res[1:])


def test_text_only_state_stores_no_audio_window(engine):
    _, (text_only,) = engine.step([[_utt(), _utt()]], [None])
    _, (with_audio,) = engine.step([[_utt(), _utt(audio=np.ones(4))]], [None])
    assert parts_size(text_only.to_parts()) < parts_size(with_audio.to_parts())


def test_step_does_not_modify_given_states(engine):
    _, (state,) = engine.step([[_utt()]], [None])
    before = state.to_parts()
    engine.step([[_utt("customer")]], [state])
    assert state.to_parts() == before


def test_paper_mode_has_no_streaming():
    model = CFNESA(
        ModelConfig(mode="paper", text_dim=8, d_model=16, heads=2, label_names=("a", "b"))
    )
    with pytest.raises(InputError):
        StreamingEngine(model, "x")


def test_state_parts_write_only_what_changed(engine):
    """The parts a store writes per step: the core and the new slot, nothing older."""
    state = None
    store: dict[str, bytes] = {}
    for i in range(6):
        _, (state,) = engine.step([[_utt(speaker=f"s{i % 2}")]], [state])
        written = state.to_parts(since=state.position - 1)
        assert set(written) == {"core", f"w{(state.position - 1) % 2}"}  # W=3: 2 slots
        store.update(written)
    again = ConversationState.from_parts(store, expected_fingerprint="abc")
    assert torch.equal(again.win_x, state.win_x)
    assert torch.equal(again.win_present, state.win_present)
    assert torch.equal(again.rume_h, state.rume_h)
    # a slot from an older lap of the ring, or a missing slot, is corrupt, never used
    stale = dict(store)
    stale["w1"] = state.to_parts(since=0)["w0"]
    with pytest.raises(StateFormatError):
        ConversationState.from_parts(stale)
    with pytest.raises(StateFormatError):
        ConversationState.from_parts({k: v for k, v in store.items() if k != "w0"})
    with pytest.raises(FingerprintMismatchError):
        ConversationState.from_parts(store, expected_fingerprint="other")
    with pytest.raises(StateFormatError):
        ConversationState.from_parts({"w0": store["w0"]})
