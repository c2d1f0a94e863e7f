"""CFN-ESA: projection -> RUME -> text-centred ACME -> fusion -> emotion head + LESM.

One network, two modes (see ``ModelConfig.mode``). The same ``forward`` serves
training (whole dialogues, no state) and streaming (a chunk of new utterances
per conversation plus the state of what came before): in causal mode a
chunk's outputs depend only on the chunk and the state, so feeding a dialogue
in any chunking gives the numbers of feeding it whole.

Missing modalities: every utterance carries a presence flag per modality.
An absent modality's GRU state does not advance, its keys take no part in any
attention, and it contributes zeros to fusion. A modality absent from every
utterance of a call costs no compute at all.

Shapes: B conversations, L new utterances each (right-padded), C cached window
slots (W-1 in causal streaming, 0 when there is no state), K = C + L keys,
M modalities, d the model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.config import ModelConfig

TEXT = "text"


@dataclass
class BatchState:
    """Per-conversation streaming state, stacked over a batch (all float32 but masks).

    Attributes:
        rume_h: (M, R, B, d) GRU hidden state per modality and RUME layer.
        win_x: (A, M, B, C, d) the window's inputs to each ACME layer.
        win_s: (A, M, B, C, d) the window's self-attention outputs per layer
            (the keys of the cross-modal attention; a one-modality model has none
            and never reads them: they stay zeros).
        win_present: (B, C, M) modality present in a window slot.
    """

    rume_h: Tensor
    win_x: Tensor
    win_s: Tensor
    win_present: Tensor


@dataclass
class ForwardOutput:
    """What one forward pass returns.

    Attributes:
        logits: (B, L, C) emotion logits.
        fused: (B, L, d) fused vectors z (LESM's input).
        shift_prev: (B, L, 2) LESM logits vs the previous utterance.
        shift_speaker: (B, L, 2) LESM logits vs the same speaker's previous one.
        pair_logits: (B, L, L, 2) LESM logits for every pair (i, j), training only.
        state: the state after the chunk (streaming only).
    """

    logits: Tensor
    fused: Tensor
    shift_prev: Tensor
    shift_speaker: Tensor
    pair_logits: Tensor | None = None
    state: BatchState | None = None


class Attention(nn.Module):
    """Multi-head attention with a boolean mask; a query with no key gets zeros."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query (B, Lq, d), keys (B, K, d), mask (B, Lq, K) True = may attend."""
        b, lq, d = query.shape
        k_len = keys.shape[1]
        h = self.heads
        q = self.q(query).view(b, lq, h, d // h).transpose(1, 2)  # (B, h, Lq, hd)
        k, v = self.kv(keys).view(b, k_len, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, K, hd)
        has_key = mask.any(-1, keepdim=True)  # (B, Lq, 1)
        # A query with nothing to attend to would be NaN: let it attend to
        # everything, then zero it. "No information" is a zero vector.
        safe = mask | ~has_key
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=safe.unsqueeze(1))
        att = att.transpose(1, 2).reshape(b, lq, d)  # (B, Lq, d)
        return self.out(att) * has_key


class FeedForward(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(self.drop(F.relu(self.up(x)))))


class RUMELayer(nn.Module):
    """GRU -> linear -> residual norm -> FFN -> residual norm (one RUME layer)."""

    def __init__(self, d: int, bidirectional: bool, dropout: float) -> None:
        super().__init__()
        self.gru = nn.GRU(d, d, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(2 * d if bidirectional else d, d)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, dropout)
        self.norm2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, h0: Tensor | None, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """x (N, L, d), h0 (N, d) or None, lengths (N,) when rows are ragged.

        Returns the layer output (N, L, d) and the last hidden state (N, d)
        (unidirectional; for the bidirectional GRU the forward direction's).
        """
        seq = x.shape[1]
        h = None if h0 is None else h0.unsqueeze(0).contiguous()
        if lengths is None:
            g, hn = self.gru(x, h)
        else:
            packed = pack_padded_sequence(
                x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
            )
            g_packed, hn = self.gru(packed, h)
            g, _ = pad_packed_sequence(g_packed, batch_first=True, total_length=seq)
        y = self.norm1(x + self.drop(self.proj(g)))
        return self.norm2(x + y + self.ffn(y)), hn[0]


class ACMELayer(nn.Module):
    """Text-centred cross-modal layer: self-attention per modality, text attends
    to every other modality, every other modality attends to text, then FFNs."""

    def __init__(self, d: int, heads: int, dropout: float, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.modalities = modalities
        others = [m for m in modalities if m != TEXT]
        self.self_attn = nn.ModuleDict({m: Attention(d, heads) for m in modalities})
        self.text_to = nn.ModuleDict({m: Attention(d, heads) for m in others})  # MHA_tm
        self.to_text = nn.ModuleDict({m: Attention(d, heads) for m in others})  # MHA_m
        self.text_mix = nn.Linear(len(others) * d, d) if others else None
        self.norm_self = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        self.norm_cross = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        self.norm_out = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        self.ffn = nn.ModuleDict({m: FeedForward(d, dropout) for m in modalities})
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x_new: dict[str, Tensor],
        x_cache: dict[str, Tensor],
        s_cache: dict[str, Tensor],
        masks: dict[str, Tensor],
        key_live: dict[str, bool],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One layer over the new positions of the modalities in ``x_new``.

        Args:
            x_new: per active modality, the layer input at the new positions (B, L, d).
            x_cache, s_cache: per modality, the window's cached inputs and
                self-attention outputs (B, C, d).
            masks: per modality, (B, L, K) which keys of that modality a new
                position may attend to (window band, padding, presence).
            key_live: per modality, whether any key of it is present anywhere
                in the batch (a cross-attention with no live key is skipped).

        Returns:
            (out, s_new): per active modality, the layer output and the
            self-attention output at the new positions, both (B, L, d).
        """
        s_new: dict[str, Tensor] = {}
        for m, x in x_new.items():
            keys = torch.cat([x_cache[m], x], dim=1)  # (B, K, d)
            s_new[m] = self.norm_self[m](x + self.drop(self.self_attn[m](x, keys, masks[m])))

        def s_keys(m: str, like: Tensor) -> Tensor:
            new = s_new[m] if m in s_new else torch.zeros_like(like)
            return torch.cat([s_cache[m], new], dim=1)  # (B, K, d)

        out: dict[str, Tensor] = {}
        for m, x in x_new.items():
            s = s_new[m]
            if m == TEXT:
                if self.text_mix is None:
                    c = torch.zeros_like(s)
                else:
                    parts = []
                    for o in self.text_to:
                        if key_live[o]:
                            parts.append(self.text_to[o](s, s_keys(o, s), masks[o]))
                        else:
                            parts.append(torch.zeros_like(s))
                    c = self.drop(F.relu(self.text_mix(torch.cat(parts, dim=-1))))
            elif key_live[TEXT]:
                c = self.drop(self.to_text[m](s, s_keys(TEXT, s), masks[TEXT]))
            else:
                c = torch.zeros_like(s)
            c = self.norm_cross[m](x + s + c)
            out[m] = self.norm_out[m](x + c + self.ffn[m](c))
        return out, s_new


class LESM(nn.Module):
    """Label-based emotion-shift module: does utterance i's emotion differ from j's?"""

    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.first = nn.Linear(2 * d, hidden)
        self.second = nn.Linear(hidden, 2)
        self.drop = nn.Dropout(dropout)

    def forward(self, z_i: Tensor, z_j: Tensor) -> Tensor:
        """z_i, z_j (..., d) -> logits (..., 2)."""
        return self.second(self.drop(F.relu(self.first(torch.cat([z_i, z_j], dim=-1)))))

    def all_pairs(self, z_i: Tensor, z_j: Tensor) -> Tensor:
        """z_i, z_j (B, L, d) -> logits (B, L, L, 2) for every pair (i, j).

        The first layer is linear in the concatenation, so it splits into a
        term for i and one for j: (B, L, L, hidden) is built by broadcasting
        instead of materialising (B, L, L, 2d).
        """
        d = z_i.shape[-1]
        w_i, w_j = self.first.weight[:, :d], self.first.weight[:, d:]
        a = z_i @ w_i.T + self.first.bias  # (B, L, hidden)
        b = z_j @ w_j.T  # (B, L, hidden)
        h = F.relu(a.unsqueeze(2) + b.unsqueeze(1))  # (B, L, L, hidden)
        return self.second(self.drop(h))


class CFNESA(nn.Module):
    """The network. See the module docstring for the two ways it is called."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        mods = config.modalities
        self.modalities = mods
        self.proj = nn.ModuleDict({m: nn.Linear(config.dim(m), d) for m in mods})
        # ONE stack of RUME weights, applied to every modality.
        self.rume = nn.ModuleList(
            RUMELayer(d, not config.causal, config.rume_dropout) for _ in range(config.rume_layers)
        )
        self.acme = nn.ModuleList(
            ACMELayer(d, config.heads, config.acme_dropout, mods) for _ in range(config.acme_layers)
        )
        self.fuse = nn.Linear(len(mods) * d, d)
        self.fuse_drop = nn.Dropout(config.acme_dropout)
        self.classifier = nn.Linear(d, config.num_classes)
        self.lesm = LESM(d, config.lesm_hidden, config.lesm_dropout)

    # ------------------------------------------------------------------ state

    @property
    def cache_slots(self) -> int:
        """C: window slots kept in the state (W - 1; the new utterance is the W-th)."""
        return self.config.window_utterances - 1

    def empty_state(self, batch: int, device: torch.device | None = None) -> BatchState:
        c, d = self.config, self.config.d_model
        m, a = len(self.modalities), c.acme_layers
        f32 = dict(dtype=torch.float32, device=device)
        return BatchState(
            rume_h=torch.zeros(m, c.rume_layers, batch, d, **f32),  # type: ignore[arg-type]
            win_x=torch.zeros(a, m, batch, self.cache_slots, d, **f32),  # type: ignore[arg-type]
            win_s=torch.zeros(a, m, batch, self.cache_slots, d, **f32),  # type: ignore[arg-type]
            win_present=torch.zeros(batch, self.cache_slots, m, dtype=torch.bool, device=device),
        )

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        features: dict[str, Tensor],
        present: Tensor,
        valid: Tensor,
        prev_index: Tensor,
        speaker_prev_index: Tensor,
        *,
        state: BatchState | None = None,
        fused_bank: Tensor | None = None,
        return_state: bool = False,
        all_pairs: bool = False,
    ) -> ForwardOutput:
        """Run new utterances of B conversations.

        Args:
            features: per modality, (B, L, D_m) inputs; a modality the model has
                may be missing from the dict when absent from every utterance.
            present: (B, L, M) modality present (False at padding).
            valid: (B, L) a real utterance, not padding.
            prev_index, speaker_prev_index: (B, L) the index, in
                ``cat(fused_bank, fused)`` along dim 1, of the previous utterance
                and of the same speaker's previous utterance; -1 when none.
            state: the conversations' state before the chunk (None: a fresh start).
            fused_bank: (B, S, d) fused vectors of earlier utterances the indices
                may point to (None: S = 0).
            return_state: also return the state after the chunk (causal mode).
            all_pairs: also return LESM logits for every pair (training).
        """
        b = valid.shape[0]
        if return_state and not self.config.causal:
            raise RuntimeError("paper mode is bidirectional: it has no streaming state")
        if return_state and state is None:
            state = self.empty_state(b, valid.device)

        # Modalities present somewhere in the new utterances: only these run.
        active = [m for i, m in enumerate(self.modalities) if bool(present[..., i].any())]
        x_new, rume_h = self._rume(features, present, valid, active, state)
        fused, new_win = self._acme_fuse(x_new, present, valid, active, state, return_state)

        bank = fused if fused_bank is None else torch.cat([fused_bank, fused], dim=1)
        shift_prev = self._pick_shift(fused, bank, prev_index)
        shift_speaker = self._pick_shift(fused, bank, speaker_prev_index)

        pair_logits = None
        if all_pairs:
            # LESM compares z_i with z'_j from a second pass (another dropout
            # sample during training; identical at inference).
            second = self._acme_fuse(x_new, present, valid, active, state, False)[0]
            pair_logits = self.lesm.all_pairs(fused, second if self.training else fused)

        new_state = None
        if return_state:
            assert rume_h is not None and new_win is not None
            new_state = BatchState(rume_h=rume_h, **new_win)
        return ForwardOutput(
            logits=self.classifier(fused) / self.config.emotion_temperature,
            fused=fused,
            shift_prev=shift_prev,
            shift_speaker=shift_speaker,
            pair_logits=pair_logits,
            state=new_state,
        )

    def _pick_shift(self, fused: Tensor, bank: Tensor, index: Tensor) -> Tensor:
        """LESM logits of each new utterance against bank[index]; NaN where index < 0."""
        d = fused.shape[-1]
        other = bank.gather(1, index.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))  # (B, L, d)
        logits = self.lesm(fused, other) / self.config.shift_temperature  # (B, L, 2)
        return logits.masked_fill((index < 0).unsqueeze(-1), float("nan"))

    def _rume(
        self,
        features: dict[str, Tensor],
        present: Tensor,
        valid: Tensor,
        active: list[str],
        state: BatchState | None,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Project and run the shared RUME stack over the active modalities.

        The modalities are stacked along the batch (one GRU call for all: the
        weights are shared). A modality's GRU advances only over utterances
        where it is present: those are gathered to the front of each row, run
        as a packed sequence, and scattered back.
        """
        b, seq = valid.shape
        d = self.config.d_model
        idx = [self.modalities.index(m) for m in active]
        rume_h = None if state is None else state.rume_h.clone()
        if not active:
            return {}, rume_h
        x = torch.cat([self.proj[m](features[m]) for m in active], dim=0)  # (|a|*B, L, d)
        keep = torch.cat([valid & present[..., i] for i in idx], dim=0)  # (|a|*B, L)
        lengths = keep.sum(1)
        order = None
        if not bool(keep.all()):
            if seq > 1:
                # kept positions first, in their order (a stable sort of ~keep)
                order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
                x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
            ragged = bool(((lengths > 0) & (lengths < seq)).any())
        else:
            ragged = False
        h0 = (
            None
            if state is None
            else state.rume_h[idx]
            .permute(1, 0, 2, 3)
            .reshape(self.config.rume_layers, len(idx) * b, d)
        )  # (R, |a|*B, d)
        last = []
        for r, layer in enumerate(self.rume):
            x, hn = layer(x, None if h0 is None else h0[r], lengths if ragged else None)
            last.append(hn)
        if order is not None:
            x = torch.empty_like(x).scatter_(1, order.unsqueeze(-1).expand(-1, -1, d), x)
        if rume_h is not None and h0 is not None:
            hn_all = torch.stack(last)  # (R, |a|*B, d)
            # rows with no present utterance keep their state
            hn_all = torch.where((lengths > 0).view(1, -1, 1), hn_all, h0)
            rume_h[idx] = hn_all.view(self.config.rume_layers, len(idx), b, d).permute(1, 0, 2, 3)
        return dict(zip(active, x.split(b, dim=0), strict=True)), rume_h

    def _acme_fuse(
        self,
        x_new: dict[str, Tensor],
        present: Tensor,
        valid: Tensor,
        active: list[str],
        state: BatchState | None,
        return_state: bool,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        b, seq = valid.shape
        d = self.config.d_model
        mods = self.modalities
        slots = 0 if state is None else state.win_present.shape[1]
        live = present & valid.unsqueeze(-1)  # (B, L, M)
        key_present = live if state is None else torch.cat([state.win_present, live], dim=1)
        # Which keys a new position may see: in causal mode the band of the
        # last W utterances, itself included; in paper mode every utterance.
        q_pos = torch.arange(seq, device=valid.device).unsqueeze(1) + slots  # (L, 1)
        k_pos = torch.arange(slots + seq, device=valid.device).unsqueeze(0)  # (1, K)
        if self.config.causal:
            lag = q_pos - k_pos
            band = (lag >= 0) & (lag < self.config.window_utterances)  # (L, K)
        else:
            band = torch.ones(seq, slots + seq, dtype=torch.bool, device=valid.device)
        masks = {m: band & key_present[..., i].unsqueeze(1) for i, m in enumerate(mods)}
        key_live = {m: bool(key_present[..., i].any()) for i, m in enumerate(mods)}

        def cache(t: Tensor | None, layer: int, m: str) -> Tensor:
            if t is None:
                return x_new[active[0]].new_zeros(b, 0, d)
            return t[layer, mods.index(m)]

        new_x: list[list[Tensor]] = []
        new_s: list[list[Tensor]] = []
        # every row with the same number of new utterances (the usual batch: one
        # each): the window moves by a slice instead of a gather
        n_new = valid.sum(1)  # (B,)
        uniform = int(n_new[0]) if return_state and bool((n_new == n_new[0]).all()) else None
        # only cross-modal attentions read win_s: one modality, nothing to keep
        keep_s = len(mods) > 1
        h = x_new
        for a, layer in enumerate(self.acme):
            x_cache = {m: cache(None if state is None else state.win_x, a, m) for m in mods}
            s_cache = {m: cache(None if state is None else state.win_s, a, m) for m in mods}
            out, s_new = layer(h, x_cache, s_cache, masks, key_live)
            if return_state:
                new_x.append(self._shift_window(x_cache, h, valid, uniform))
                if keep_s:
                    new_s.append(self._shift_window(s_cache, s_new, valid, uniform))
                else:
                    new_s.append([s_cache[m] for m in mods])  # zeros, as they came
            h = out

        parts = []
        for i, m in enumerate(mods):
            if m in h:
                parts.append(h[m] * live[..., i : i + 1])
            else:
                parts.append(valid.new_zeros(b, seq, d, dtype=torch.float32))
        fused = self.fuse_drop(F.relu(self.fuse(torch.cat(parts, dim=-1))))  # (B, L, d)

        new_win = None
        if return_state:
            assert state is not None
            new_win = dict(
                win_x=torch.stack([torch.stack(row) for row in new_x]),  # (A, M, B, C, d)
                win_s=torch.stack([torch.stack(row) for row in new_s]),
                win_present=self._take_last(key_present, valid, uniform),
            )
        return fused, new_win

    def _take_last(self, seq_all: Tensor, valid: Tensor, uniform: int | None = None) -> Tensor:
        """The last C slots of ``cat(window, new)`` for each row, after its real
        new utterances (rows are right-padded): (B, C + L, ...) -> (B, C, ...).
        ``uniform``: every row has that many new utterances (a slice does it)."""
        c = self.cache_slots
        if uniform is not None:
            return seq_all[:, uniform : uniform + c]
        n_new = valid.sum(1)  # (B,)
        index = n_new.unsqueeze(1) + torch.arange(c, device=valid.device)  # (B, C)
        shape = index.shape + seq_all.shape[2:]
        index = index.view(*index.shape, *([1] * (seq_all.dim() - 2))).expand(shape)
        return seq_all.gather(1, index)

    def _shift_window(
        self,
        cached: dict[str, Tensor],
        new: dict[str, Tensor],
        valid: Tensor,
        uniform: int | None = None,
    ) -> list[Tensor]:
        rows = []
        for m in self.modalities:
            old = cached[m]  # (B, C, d)
            cur = new[m] if m in new else old.new_zeros(old.shape[0], valid.shape[1], old.shape[2])
            rows.append(self._take_last(torch.cat([old, cur], dim=1), valid, uniform))
        return rows
