"""The key property of the project: streaming equals the whole-dialogue forward.

For random dialogues (random lengths up to 150, speakers, modality presence and
window sizes), feeding the utterances step by step, in random chunks and in
random batch mixes of conversations at different positions, through states
serialised between steps (to bytes, or to parts merged into a store the way
the Redis state store writes only what changed), gives the probabilities of
the whole-dialogue causal forward (the training path) within 1e-4.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.engine import StreamingEngine, Utterance, UtteranceResult
from model.network import CFNESA
from model.state import ConversationState, parts_size

TOL = 1e-4
DIMS = {"text": 12, "audio": 7, "visual": 5}


def _engine(window: int, seed: int, modalities: tuple[str, ...]) -> StreamingEngine:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        text_dim=DIMS["text"],
        audio_dim=DIMS["audio"] if "audio" in modalities else 0,
        visual_dim=DIMS["visual"] if "visual" in modalities else 0,
        d_model=16,
        heads=4,
        rume_layers=2,
        acme_layers=2,
        window_utterances=window,
        label_names=("a", "b", "c", "d"),
        max_speakers=3,
    )
    return StreamingEngine(CFNESA(cfg), fingerprint=f"test-{seed}")


def _dialogue(
    rng: np.random.Generator, length: int, modalities: tuple[str, ...]
) -> list[Utterance]:
    p_present = rng.uniform(0.2, 1.0, size=3)
    speakers = [f"spk{i}" for i in range(int(rng.integers(1, 6)))]
    out = []
    for _ in range(length):
        present = {m: bool(rng.random() < p) for m, p in zip(DIMS, p_present, strict=True)}
        present = {m: v and m in modalities for m, v in present.items()}
        if not any(present.values()):
            present[str(rng.choice(modalities))] = True
        feats = {
            m: rng.standard_normal(DIMS[m]).astype(np.float32) if present[m] else None for m in DIMS
        }
        out.append(Utterance(speaker=str(rng.choice(speakers)), **feats))
    return out


def _close(a: UtteranceResult, b: UtteranceResult) -> float:
    err = float(np.abs(a.probabilities - b.probabilities).max())
    for x, y in (
        (a.shift_vs_previous, b.shift_vs_previous),
        (a.shift_vs_speaker_previous, b.shift_vs_speaker_previous),
    ):
        assert (x is None) == (y is None), (x, y)
        if x is not None and y is not None:
            err = max(err, abs(x - y))
    return err


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**16),
    window=st.integers(1, 12),
    lengths=st.lists(st.integers(1, 150), min_size=1, max_size=5),
    modalities=st.sampled_from([("text",), ("text", "audio"), ("text", "audio", "visual")]),
    max_chunk=st.integers(1, 6),
    codec=st.sampled_from(["whole", "parts"]),
)
def test_streaming_equals_whole_dialogue(seed, window, lengths, modalities, max_chunk, codec):
    rng = np.random.default_rng(seed)
    engine = _engine(window, seed, modalities)
    dialogues = [_dialogue(rng, n, modalities) for n in lengths]
    reference = [engine.run_dialogue(d) for d in dialogues]

    states: list[dict[str, bytes] | None] = [None] * len(dialogues)
    stores: list[dict[str, bytes]] = [{} for _ in dialogues]  # parts, merged per write
    positions = [0] * len(dialogues)
    streamed: list[list[UtteranceResult]] = [[] for _ in dialogues]
    while any(p < len(d) for p, d in zip(positions, dialogues, strict=True)):
        open_ = [i for i, d in enumerate(dialogues) if positions[i] < len(d)]
        # a random mix of the open conversations, each at its own position
        picked = [i for i in open_ if rng.random() < 0.6] or [open_[0]]
        chunks = []
        for i in picked:
            size = int(rng.integers(1, max_chunk + 1))
            chunks.append(dialogues[i][positions[i] : positions[i] + size])
        if codec == "whole":
            loaded = [None if states[i] is None else engine.load_state(states[i]) for i in picked]
        else:
            loaded = [
                ConversationState.from_parts(stores[i], expected_fingerprint=engine.fingerprint)
                if stores[i]
                else None
                for i in picked
            ]
        results, new_states = engine.step(chunks, loaded)
        for i, res, state in zip(picked, results, new_states, strict=True):
            streamed[i].extend(res)
            positions[i] += len(res)
            assert state.position == positions[i]
            if codec == "whole":
                states[i] = state.to_parts()  # every part rewritten each step
            else:
                stores[i].update(state.to_parts(since=positions[i] - len(res)))

    for ref, got in zip(reference, streamed, strict=True):
        assert [r.position for r in got] == list(range(len(ref)))
        worst = max(_close(a, b) for a, b in zip(ref, got, strict=True))
        assert worst <= TOL, f"streamed output differs from the whole-dialogue forward by {worst}"


def test_step_cost_does_not_depend_on_position():
    """A state's size is fixed by the window, not the conversation's length."""
    rng = np.random.default_rng(0)
    engine = _engine(4, 0, ("text",))
    dialogue = _dialogue(rng, 60, ("text",))
    state: ConversationState | None = None
    sizes = []
    for utt in dialogue:
        _, (state,) = engine.step([[utt]], [state])
        sizes.append(parts_size(state.to_parts()))
    # after the window fills and the speakers are known, the size is constant
    assert len(set(sizes[20:])) == 1


def test_paper_mode_sees_the_future_and_causal_does_not():
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    base = dict(text_dim=12, d_model=16, heads=4, acme_layers=1, label_names=("a", "b"))
    dialogue = _dialogue(rng, 6, ("text",))
    changed = [*dialogue[:-1], _dialogue(rng, 1, ("text",))[0]]
    for mode, expect_same in (("causal", True), ("paper", False)):
        model = CFNESA(ModelConfig(mode=mode, window_utterances=6, **base)).eval()  # type: ignore[arg-type]
        with torch.inference_mode():
            outs = []
            for d in (dialogue, changed):
                x = torch.tensor(np.stack([u.text for u in d]))[None]
                valid = torch.ones(1, len(d), dtype=torch.bool)
                none = torch.full((1, len(d)), -1)
                outs.append(model({"text": x}, valid[..., None], valid, none, none).logits[0, 0])
        # changing the LAST utterance changes the first's output only in paper mode
        assert torch.allclose(outs[0], outs[1], atol=1e-6) == expect_same
