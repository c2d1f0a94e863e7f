"""One conversation's streaming state, kept outside the model, and its stored parts.

What a causal step needs from the past, and nothing more:

- the RUME GRU hidden state per modality and layer,
- the window: the last W-1 utterances' inputs to every ACME layer (and their
  self-attention outputs where a cross-modal attention reads them), with the
  modalities present in each slot,
- the last fused vector of each speaker (LESM's comparisons), and which
  speaker spoke last (the previous utterance is that speaker's last).

Stored form: named parts, so that a store writes only what changed (the Redis
state store): ``core`` (header, RUME hidden state, speaker vectors; rewritten every
step) and one part per window slot, ``w{p % C}`` for the utterance at position
``p``, written once and read until the window moves past it.
``to_parts(since=...)`` returns the core and the slots of positions ``>= since``
only. Each part is little-endian::

    core:  b"CFNS" | u16 format version | u32 header length | header JSON | float32 blobs
    slot:  b"CFNW" | u16 slot version 2 | u64 position | u8 presence bits | u8 flags
           | float32 blobs: layer inputs (A, present, d), then, if flags bit 0, the
           self-attention outputs (A, present, d)

The header names the model fingerprint, position and speakers. A slot stores only
the modalities present in its utterance (a phone call's state holds no visual
window), so a state is as large as its call. It stores the self-attention outputs
only where the model reads them: the cross-modal attentions read them (text's of
the other modalities, the others' of text), so a one-modality model (the shipped
text-only one) never does, and its slots carry the layer inputs alone (half the
bytes; those outputs load as zeros). Slots of version 1 (always both) are still
read. `parts_size` is what a state costs to store whole.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.errors import FingerprintMismatchError, StateFormatError

MAGIC = b"CFNS"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sHI")
_SLOT_V1 = struct.Struct("<4sHQB")  # magic, version, position, presence bits
_SLOT = struct.Struct("<4sHQBB")  # magic, version, position, presence bits, flags
SLOT_MAGIC = b"CFNW"
SLOT_VERSION = 2
_SELF_OUTPUTS = 1  # slot flag: the self-attention outputs follow the layer inputs
CORE = "core"


@dataclass
class ConversationState:
    """State of one conversation after ``position`` utterances.

    Attributes:
        fingerprint: the model that wrote it; another model refuses it.
        position: utterances consumed so far.
        rume_h: (M, R, d) GRU hidden state per modality and RUME layer.
        win_x, win_s: (A, M, C, d) per ACME layer and modality, the window's
            layer inputs and self-attention outputs.
        win_present: (C, M) bool, modality present in each window slot.
        speakers: speaker -> (d,) fused vector of their last utterance, in
            order of recency (the last item spoke last).
    """

    fingerprint: str
    position: int
    rume_h: Tensor
    win_x: Tensor
    win_s: Tensor
    win_present: Tensor
    speakers: dict[str, Tensor] = field(default_factory=dict)

    @property
    def last_speaker(self) -> str | None:
        return next(reversed(self.speakers)) if self.speakers else None

    def _header(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "position": self.position,
            "shape": {
                "modalities": self.rume_h.shape[0],
                "rume_layers": self.rume_h.shape[1],
                "acme_layers": self.win_x.shape[0],
                "slots": self.win_x.shape[2],
                "d": self.rume_h.shape[2],
            },
            "speakers": list(self.speakers),
        }

    # ------------------------------------------------------------------ parts

    def to_parts(self, since: int | None = None) -> dict[str, bytes]:
        """The state as named parts: ``core`` and the window slots of positions
        ``>= since`` (all slots when None). See the module docstring."""
        m_count = self.rume_h.shape[0]
        slots = self.win_x.shape[2]
        blobs = [_f32(self.rume_h)]
        if self.speakers:
            blobs.append(_f32(torch.stack(list(self.speakers.values()))))
        parts = {CORE: _pack(self._header(), blobs)}
        first = max(self.position - slots, 0 if since is None else since)
        if first >= self.position:
            return parts
        # one conversion to numpy, then plain slicing per slot (no per-element torch calls)
        win_present = self.win_present.numpy()  # (C, M)
        win_x = _np32(self.win_x)  # (A, M, C, d)
        with_s = m_count > 1  # see the module docstring: only then is win_s ever read
        win_s = _np32(self.win_s) if with_s else None
        flags = _SELF_OUTPUTS if with_s else 0
        for p in range(first, self.position):
            j = p - (self.position - slots)
            row = win_present[j]
            present = [i for i in range(m_count) if row[i]]
            bits = sum(1 << i for i in present)
            body = [_SLOT.pack(SLOT_MAGIC, SLOT_VERSION, p, bits, flags)]
            if present:
                body.append(win_x[:, present, j].tobytes())
                if win_s is not None:
                    body.append(win_s[:, present, j].tobytes())
            parts[slot_name(p, slots)] = b"".join(body)
        return parts

    @classmethod
    def from_parts(
        cls, parts: dict[str, bytes], *, expected_fingerprint: str | None = None
    ) -> ConversationState:
        """Assemble a state from ``to_parts`` output (old slots may linger: only
        the slots of the window's positions are read, and each must name its
        position).

        Raises:
            StateFormatError: missing or corrupt parts, an unknown version.
            FingerprintMismatchError: written by another model than expected.
        """
        core = parts.get(CORE)
        if core is None:
            raise StateFormatError("state has no core part")
        header, body_at = _unpack(core, expected_fingerprint)
        m, r, a, c, d = header.dims
        fingerprint, speakers, position = header.fingerprint, header.speakers, header.position
        win_x = torch.zeros(a, m, c, d)
        win_s = torch.zeros(a, m, c, d)
        present_mask = torch.zeros(c, m, dtype=torch.bool)
        try:
            reader = _Reader(core, body_at)
            rume_h = reader.f32((m, r, d))
            vectors = reader.f32((len(speakers), d)) if speakers else torch.zeros(0, d)
            reader.done()
            for p in range(max(position - c, 0), position):
                j = p - (position - c)
                blob = parts.get(slot_name(p, c))
                if blob is None:
                    raise ValueError(f"window slot of position {p} missing")
                smagic, sversion = _SLOT_V1.unpack_from(blob)[:2]
                if smagic != SLOT_MAGIC or sversion not in (1, SLOT_VERSION):
                    raise ValueError(f"window slot of position {p}: bad magic or version")
                if sversion == 1:  # written before version 2: both blobs, always
                    _, _, spos, bits = _SLOT_V1.unpack_from(blob)
                    flags, body_at = _SELF_OUTPUTS, _SLOT_V1.size
                else:
                    _, _, spos, bits, flags = _SLOT.unpack_from(blob)
                    body_at = _SLOT.size
                if spos != p:
                    raise ValueError(f"window slot holds position {spos}, expected {p}")
                present = [i for i in range(m) if bits >> i & 1]
                slot_reader = _Reader(blob, body_at)
                if present:
                    win_x[:, present, j] = slot_reader.f32((a, len(present), d))
                    if flags & _SELF_OUTPUTS:
                        win_s[:, present, j] = slot_reader.f32((a, len(present), d))
                    present_mask[j, present] = True
                slot_reader.done()
        except (ValueError, struct.error) as exc:
            raise StateFormatError(f"corrupt state: {exc}") from exc
        return cls(
            fingerprint=fingerprint,
            position=position,
            rume_h=rume_h,
            win_x=win_x,
            win_s=win_s,
            win_present=present_mask,
            speakers={s: vectors[i] for i, s in enumerate(speakers)},
        )


def parts_size(parts: dict[str, bytes]) -> int:
    """Bytes of values in ``parts`` (what the store holds for a state)."""
    return sum(len(v) for v in parts.values())


def slot_name(position: int, slots: int) -> str:
    """The part name of the window slot holding the utterance at ``position``."""
    return f"w{position % slots}" if slots else "w"


@dataclass(frozen=True)
class _Header:
    raw: dict[str, Any]
    fingerprint: str
    position: int
    speakers: list[str]
    dims: tuple[int, int, int, int, int]  # modalities, rume layers, acme layers, slots, d


def _pack(header: dict[str, Any], blobs: list[bytes]) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, FORMAT_VERSION, len(head)) + head + b"".join(blobs)


def _unpack(data: bytes, expected_fingerprint: str | None) -> tuple[_Header, int]:
    """Check magic, version and fingerprint; parse the header. Returns it and where
    the blobs start."""
    if len(data) < _HEAD.size:
        raise StateFormatError(f"state too short ({len(data)} bytes)")
    magic, version, head_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise StateFormatError("not a CFN-ESA conversation state (bad magic)")
    if version != FORMAT_VERSION:
        raise StateFormatError(
            f"state format version {version}; this code reads version {FORMAT_VERSION}"
        )
    try:
        raw = json.loads(data[_HEAD.size : _HEAD.size + head_len])
        shape = raw["shape"]
        dims = tuple(
            int(shape[k]) for k in ("modalities", "rume_layers", "acme_layers", "slots", "d")
        )
        header = _Header(
            raw=raw,
            fingerprint=str(raw["fingerprint"]),
            position=int(raw["position"]),
            speakers=[str(x) for x in raw["speakers"]],
            dims=dims,  # type: ignore[arg-type]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFormatError(f"corrupt state header: {exc}") from exc
    if expected_fingerprint is not None and header.fingerprint != expected_fingerprint:
        raise FingerprintMismatchError(
            f"state written by model {header.fingerprint}, this model is {expected_fingerprint}"
        )
    return header, _HEAD.size + head_len


def _f32(t: Tensor) -> bytes:
    return _np32(t).tobytes()


def _np32(t: Tensor) -> np.ndarray:
    """``t`` as a little-endian float32 numpy array (a view where it already is one)."""
    return t.detach().to(torch.float32).numpy().astype("<f4", copy=False)


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def raw(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.offset : self.offset + n]
        self.offset += n
        return out

    def f32(self, shape: tuple[int, ...]) -> Tensor:
        n = int(np.prod(shape))
        arr = np.frombuffer(self.raw(4 * n), dtype="<f4").reshape(shape)
        return torch.from_numpy(arr.copy())

    def done(self) -> None:
        if self.offset != len(self.data):
            raise ValueError(f"{len(self.data) - self.offset} trailing bytes")
