"""Checkpoint files (v3): a plain ``torch.save`` archive that ``torch.load(weights_only=True)``
reads, with top-level c/w/b, and a sha256 in the zip comment that ``load_checkpoint`` checks;
truncated, corrupt and foreign files are CheckpointErrors; v2 and v1 files still load."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ntk_rnn.checkpoint import (
    FORMAT,
    MAGIC,
    TRAILER,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

from .conftest import make_cfg


def write_v2(path: Path, payload: dict) -> Path:
    """The v2 writer (before v3): text header with sha256 and length, then the torch.save bytes."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    blob = buf.getvalue()
    path.write_bytes(MAGIC + b"sha256=%s bytes=%d\n" % (hashlib.sha256(blob).hexdigest().encode(),
                                                         len(blob)) + blob)
    return path


def member_data_offset(path: Path, name: str) -> int:
    """Where the bytes of zip member ``name`` start in the file (stored, uncompressed)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(name))
    raw = path.read_bytes()
    h = info.header_offset
    assert raw[h:h + 4] == b"PK\x03\x04" and info.compress_type == zipfile.ZIP_STORED
    n_name, n_extra = struct.unpack("<HH", raw[h + 26:h + 30])
    return h + 30 + n_name + n_extra


def payload(width: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    model = {k: torch.randn(*s, generator=g, dtype=torch.float64)
             for k, s in (("c", (width,)), ("w", (width, 2)), ("b", (width,)))}
    return {"step": 7, "model": model, "online": {"p": torch.zeros(width, 3)},
            "sq_err": torch.rand(7, generator=g), "config": "seed: 0\n", "seed": 0,
            "callbacks": {"ntk": {"k": torch.ones(2)}}}


def test_plain_torch_load_reads_a_checkpoint_with_top_level_cwb(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", payload())
    raw = p.read_bytes()
    assert raw.startswith(b"PK\x03\x04") and raw[-64 - len(TRAILER):-64] == TRAILER
    plain = torch.load(p, weights_only=True)  # no ntk_rnn code involved
    for k in ("c", "w", "b"):
        assert torch.equal(plain[k], payload()["model"][k]) and plain[k].dtype == torch.float64
        assert plain[k].data_ptr() == plain["model"][k].data_ptr()  # stored once: aliases
    assert plain["step"] == 7 and plain["format"] == FORMAT and plain["seed"] == 0
    assert torch.equal(plain["online"]["p"], torch.zeros(6, 3))
    assert torch.load(p, weights_only=True, mmap=True)["c"].shape == (6,)
    back = load_checkpoint(p)
    assert back.keys() == plain.keys() and torch.equal(back["w"], plain["w"])
    with zipfile.ZipFile(p) as zf:  # an ordinary zip archive to other tools, comment included
        assert zf.testzip() is None and zf.comment.startswith(TRAILER)
    # the aliases cost no storage: the file is about as large as one without them
    no_alias = tmp_path / "plain.pt"
    torch.save({"format": FORMAT, **payload()}, no_alias)
    assert len(raw) < no_alias.stat().st_size + 1024
    # a payload without "model" (e.g. a cache entry) gets no aliases; its own keys win
    assert "c" not in load_checkpoint(save_checkpoint(tmp_path / "n.pt", {"step": 1}))
    own = save_checkpoint(tmp_path / "o.pt", {**payload(), "c": torch.zeros(1)})
    assert torch.equal(load_checkpoint(own)["c"], torch.zeros(1))


def trainer_class():
    from ntk_rnn.run import Trainer

    return Trainer.from_config


def test_trainer_checkpoint_loads_with_plain_torch(tmp_path):
    cfg = make_cfg("model.width=8", "train.steps=30", "callbacks=[checkpoint]",
                   "callbacks.checkpoint.every_n_steps=10", "dtype=float64")
    tr = trainer_class()(cfg, tmp_path)
    tr.fit()
    final = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert final["step"] == 30
    for k in ("c", "w", "b"):
        assert torch.equal(final[k], getattr(tr.model, k).detach().cpu())
        assert torch.equal(final[k], final["model"][k])
    for p in (tmp_path / "checkpoints").glob("step_*.pt"):
        assert load_checkpoint(p)["step"] == int(p.stem[5:])


def bad_files(p: Path) -> dict[str, tuple[str, bytes]]:
    raw = p.read_bytes()
    data0 = member_data_offset(p, "data/0")
    flip = bytearray(raw)
    flip[data0 + 3] ^= 0x01  # one bit of the first tensor
    pkl = bytearray(raw)
    pkl[member_data_offset(p, "data.pkl") + 10] ^= 0x20
    eocd = bytearray(raw)
    eocd[-64 - len(TRAILER) - 22] ^= 0xFF  # the end record's signature
    tag = bytearray(raw)
    tag[-70] ^= 0x01  # inside the comment's tag
    cases = {
        "half": ("truncated", raw[: len(raw) // 2]),
        "cut 100": ("truncated", raw[:-100]),
        "cut 1": ("truncated", raw[:-1]),
        "cut comment": ("truncated", raw[: -64 - len(TRAILER)]),
        "cut end record": ("truncated", raw[: -64 - len(TRAILER) - 22]),
        "tensor byte": ("corrupt: sha256", bytes(flip)),
        "pickle byte": ("corrupt: sha256", bytes(pkl)),
        "digest": ("corrupt: sha256", raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:])),
        "end record": ("corrupt: its zip end record", bytes(eocd)),
        "tag": ("corrupt: its zip end record or digest tag", bytes(tag)),
        "appended": ("4 bytes more than", raw + b"tail"),
        "text": ("not an ntk_rnn checkpoint", b"hello, world\n"),
        "empty": ("not an ntk_rnn checkpoint", b""),
    }
    return cases


def test_truncated_corrupt_and_foreign_files_are_checkpoint_errors(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", payload())
    for name, (msg, data) in bad_files(p).items():
        bad = tmp_path / f"bad_{name.replace(' ', '_')}.pt"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(bad)
    assert torch.equal(load_checkpoint(p)["c"], payload()["model"]["c"])  # the original is fine
    torch.save({"step": 1}, tmp_path / "foreign.pt")  # a torch file, not ours
    with pytest.raises(CheckpointError, match="not an ntk_rnn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:  # a zip, not a torch file
        zf.writestr("a.txt", "hi")
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_checkpoint(tmp_path / "other.zip")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_old_formats_still_load(tmp_path):
    v2 = write_v2(tmp_path / "v2.pt", payload())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(v2, weights_only=True)  # why v3 exists
    back = load_checkpoint(v2)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], payload()["model"]["w"])
    raw = v2.read_bytes()
    for msg, data in {"truncated": raw[:-100], "corrupt: sha256": raw[:-10] + b"\0" * 10,
                      "damaged header": raw[: len(MAGIC) + 5],
                      "more than its header": raw + b"tail"}.items():
        (tmp_path / "bad.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(tmp_path / "bad.pt")
    torch.save({"format": FORMAT, "step": 2}, tmp_path / "v1.pt")  # v1: a bare torch.save zip
    assert load_checkpoint(tmp_path / "v1.pt")["step"] == 2


